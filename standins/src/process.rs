//! A real switchyard process: started from a prepared `Command` (`run` or `demo` on a
//! config file), its listeners read from the start line it logs, and its log kept so a
//! caller can look for a line later. The rehearsal and the tests that need the real
//! binary (signals, SIGKILL, the demo) start it this way.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A started process. It is not stopped on drop: the owner decides (kill, or a
/// signal and a wait for the exit status).
pub struct Switchyard {
    pub child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub log: Log,
}

/// The process's log lines so far (its stderr), filled as they come.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The first line containing `text`, waiting up to `limit` for it.
    pub fn wait_for(&self, text: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(text)) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The start line's marker: `switchyard listening proxy_addr=… admin_addr=… tls_addr=…`.
const LISTENING: &str = "switchyard listening";

impl Switchyard {
    /// Spawns `command` with its stderr piped, waits up to 30 s for the start line and
    /// keeps every log line; `echo` copies them to this process's stderr, prefixed,
    /// where a test harness shows them with a failure.
    pub fn start(mut command: Command, echo: bool) -> Result<Switchyard, String> {
        let mut child = command
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start switchyard: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let log = Log::default();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            // Reads to the end, so the process never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[switchyard] {line}");
                    }
                    if line.contains(LISTENING) {
                        let _ = tx.send(line.clone());
                    }
                    if let Ok(mut log) = log.0.lock() {
                        log.push(line);
                    }
                }
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(waited) => {
                let _ = child.kill();
                let _ = child.wait();
                let why = match waited {
                    std::sync::mpsc::RecvTimeoutError::Timeout => "within 30 s",
                    std::sync::mpsc::RecvTimeoutError::Disconnected => "before it exited",
                };
                return Err(format!(
                    "switchyard did not report its listeners {why}; its log: {}",
                    log.lines().join(" | ")
                ));
            }
        };
        let field =
            |name: &str| listen_field(&line, name).ok_or_else(|| format!("no {name} in `{line}`"));
        Ok(Switchyard {
            proxy_addr: field("proxy_addr")?,
            admin_addr: field("admin_addr")?,
            tls_addr: listen_field(&line, "tls_addr"),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// An address from the start line (`name=ADDR`); `None` when absent or `off`.
pub fn listen_field(line: &str, name: &str) -> Option<SocketAddr> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..].split_whitespace().next()?.parse().ok()
}
