//! Binary upgrade without a dropped connection (SIGUSR2, `POST /api/v1/upgrade`): the
//! running process starts the executable at the path it was started from (the new
//! binary, once installed there) with the same arguments, and hands it the listening
//! sockets over a Unix socket (SCM_RIGHTS). The new process loads config and state, runs
//! one round of health checks, starts accepting on the same sockets and says `ready`;
//! only then does the old one stop accepting, finish what is in flight and exit 0. The
//! sockets never close in between, so no connection is refused. If the new process
//! fails or is not ready in time, it is stopped and the old one serves on.
//!
//! The exchange on the Unix socket, new process connecting to the old:
//! old → new: one byte carrying the descriptors, then a JSON line naming them
//! (`{"listeners": [{"what": "proxy.listen", "configured": "…"}, …]}`, in order);
//! new → old: `ready <pid>` or `error <message>`, one line.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sendfd::{RecvWithFd, SendWithFd};

/// Names the Unix socket to the new process.
pub const SOCKET_ENV: &str = "SWITCHYARD_UPGRADE_SOCKET";

/// How long the new process has to become ready (config, state, one round of checks).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The most listeners handed over: proxy, TLS, admin.
const MAX_LISTENERS: usize = 3;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Header {
    listeners: Vec<Named>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Named {
    what: String,
    configured: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already in progress")]
    InProgress,
    #[error("shutting down: no upgrade")]
    ShuttingDown,
    #[error("cannot start {executable}: {source}")]
    Spawn {
        executable: String,
        source: std::io::Error,
    },
    #[error("the new process failed before it was ready: {0}; this process keeps serving")]
    Failed(String),
    #[error("the handover socket failed: {0}; this process keeps serving")]
    Socket(std::io::Error),
}

/// The old process's side: listeners to give, and the new process once it is ready.
pub(super) struct Handover {
    dir: PathBuf,
    listener: UnixListener,
    child: Child,
}

impl Drop for Handover {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A listener to hand over: its config key, the address configured, and its socket.
pub(super) struct Offered {
    pub(super) what: &'static str,
    pub(super) configured: SocketAddr,
    pub(super) fd: OwnedFd,
}

/// Starts `executable` with `args` and a private socket to receive the listeners on.
pub(super) fn spawn(
    executable: &Path,
    args: &[std::ffi::OsString],
) -> Result<Handover, UpgradeError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir =
        std::env::temp_dir().join(format!("switchyard-upgrade-{}-{stamp}", std::process::id()));
    // Only this user may connect: whoever connects gets the listening sockets.
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&dir)
        .map_err(UpgradeError::Socket)?;
    let path = dir.join("handover.sock");
    let listener = match UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(UpgradeError::Socket(e));
        }
    };
    let child = Command::new(executable)
        .args(args)
        .env(SOCKET_ENV, &path)
        .stdin(Stdio::null())
        .spawn();
    match child {
        Ok(child) => Ok(Handover {
            dir,
            listener,
            child,
        }),
        Err(source) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(UpgradeError::Spawn {
                executable: executable.display().to_string(),
                source,
            })
        }
    }
}

impl Handover {
    /// Gives the new process `offered` and waits until it says it is ready (its pid),
    /// fails, exits or runs out of `READY_TIMEOUT`; in every failure it is stopped.
    /// Blocking.
    pub(super) fn complete(mut self, offered: &[Offered]) -> Result<u32, UpgradeError> {
        let result = self.exchange(offered);
        if result.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        result
    }

    fn exchange(&mut self, offered: &[Offered]) -> Result<u32, UpgradeError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        self.listener
            .set_nonblocking(true)
            .map_err(UpgradeError::Socket)?;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.check_alive(deadline)?;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(UpgradeError::Socket(e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(UpgradeError::Socket)?;
        let fds: Vec<RawFd> = offered.iter().map(|o| o.fd.as_raw_fd()).collect();
        stream
            .send_with_fd(b"L", &fds)
            .map_err(UpgradeError::Socket)?;
        let header = Header {
            listeners: offered
                .iter()
                .map(|o| Named {
                    what: o.what.to_string(),
                    configured: o.configured,
                })
                .collect(),
        };
        let mut line = serde_json::to_vec(&header).unwrap_or_default();
        line.push(b'\n');
        (&stream).write_all(&line).map_err(UpgradeError::Socket)?;

        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(UpgradeError::Socket)?;
        let mut reader = BufReader::new(&stream);
        let mut answer = String::new();
        loop {
            match reader.read_line(&mut answer) {
                Ok(0) => {
                    // The new process closed its end: it exited, or is about to.
                    let deadline = Instant::now() + Duration::from_secs(2);
                    loop {
                        self.check_alive(deadline)?;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                Ok(_) if answer.ends_with('\n') => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.check_alive(deadline)?;
                }
                Err(e) => return Err(UpgradeError::Socket(e)),
            }
        }
        let answer = answer.trim();
        if let Some(pid) = answer.strip_prefix("ready ") {
            return pid
                .parse()
                .map_err(|_| UpgradeError::Failed(format!("unexpected answer `{answer}`")));
        }
        Err(UpgradeError::Failed(
            answer.strip_prefix("error ").unwrap_or(answer).to_string(),
        ))
    }

    /// An error once the new process has exited or `deadline` has passed.
    fn check_alive(&mut self, deadline: Instant) -> Result<(), UpgradeError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(UpgradeError::Failed(format!("it exited ({status})"))),
            Ok(None) if Instant::now() > deadline => Err(UpgradeError::Failed(format!(
                "not ready within {}s",
                READY_TIMEOUT.as_secs()
            ))),
            Ok(None) => Ok(()),
            Err(e) => Err(UpgradeError::Socket(e)),
        }
    }
}

/// The new process's side: the listeners received, by config key.
pub struct Inherited {
    stream: UnixStream,
    listeners: Vec<(Named, Option<std::net::TcpListener>)>,
}

impl Inherited {
    /// Connects to the old process at `path` and receives its listeners. Blocking.
    pub fn receive(path: &Path) -> std::io::Result<Inherited> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut byte = [0u8; 1];
        let mut fds: [RawFd; MAX_LISTENERS] = [-1; MAX_LISTENERS];
        let (_, received) = stream.recv_with_fd(&mut byte, &mut fds)?;
        let owned: Vec<OwnedFd> = fds[..received]
            .iter()
            // SAFETY: the kernel just gave this process these descriptors; nothing else
            // owns them.
            .map(|&fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
            .collect();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let header: Header = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut listeners = Vec::new();
        for (named, fd) in header.listeners.into_iter().zip(owned) {
            let listener = std::net::TcpListener::from(fd);
            // recvmsg does not set close-on-exec; a copy made by std does, so a later
            // upgrade's child gets only what it is handed.
            let listener = listener.try_clone()?;
            listener.set_nonblocking(true)?;
            listeners.push((named, Some(listener)));
        }
        Ok(Inherited { stream, listeners })
    }

    /// The listener handed over for `what`, if it was configured at `configured` there
    /// too (a changed address is bound anew).
    pub(super) fn take(
        &mut self,
        what: &str,
        configured: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        self.listeners
            .iter_mut()
            .find(|(named, _)| named.what == what && named.configured == configured)
            .and_then(|(_, listener)| listener.take())
    }

    /// Tells the old process this one serves now.
    pub(super) fn ready(&self) {
        let _ = (&self.stream).write_all(format!("ready {}\n", std::process::id()).as_bytes());
    }

    /// A second handle on the socket, to report a failure after `self` is consumed.
    pub fn reporter(&self) -> std::io::Result<FailureReporter> {
        Ok(FailureReporter(self.stream.try_clone()?))
    }
}

/// Tells the old process why this one could not start.
pub struct FailureReporter(UnixStream);

impl FailureReporter {
    pub fn fail(&self, message: &str) {
        let line = message.replace('\n', " ");
        let _ = (&self.0).write_all(format!("error {line}\n").as_bytes());
    }
}

/// Tells systemd (`Type=notify`) about this process, when it runs under it.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::debug!("sd_notify failed: {e}");
    }
}

impl super::reload::Runtime {
    /// The old process's side of an upgrade, start to handover.
    pub(super) async fn upgrade_now(
        &self,
    ) -> Result<crate::admin::Upgraded, crate::admin::UpgradeRefusal> {
        use std::sync::atomic::Ordering;
        let refusal = |code: &'static str, e: UpgradeError| crate::admin::UpgradeRefusal {
            code,
            message: e.to_string(),
        };
        if self.upgrading.swap(true, Ordering::SeqCst) {
            return Err(refusal("upgrade_in_progress", UpgradeError::InProgress));
        }
        let result = self.hand_over().await;
        if result.is_err() {
            self.upgrading.store(false, Ordering::SeqCst);
        }
        result.map_err(|e| match e {
            UpgradeError::InProgress => refusal("upgrade_in_progress", e),
            UpgradeError::ShuttingDown => refusal("not_running", e),
            e => refusal("upgrade_failed", e),
        })
    }

    async fn hand_over(&self) -> Result<crate::admin::Upgraded, UpgradeError> {
        // Held to the end: no reload, and no shutdown, in the middle of a handover.
        let live = self.live.lock().await;
        if live.shutting_down {
            return Err(UpgradeError::ShuttingDown);
        }
        let mut offered = Vec::new();
        let bound = [
            ("proxy.listen", Some(&live.plain)),
            ("proxy.tls.listen", live.tls.as_ref()),
            ("admin.listen", Some(&live.admin)),
        ];
        for (what, bound) in bound {
            let Some(bound) = bound else { continue };
            if let Some(fd) = bound.fd.as_ref().and_then(|fd| fd.try_clone().ok()) {
                offered.push(Offered {
                    what,
                    configured: bound.configured,
                    fd,
                });
            }
        }
        let info = &self.shared.info;
        let executable = info.executable.clone();
        let args = info.args.clone();
        tracing::info!(executable = %executable.display(), "upgrade: starting the new process");
        let control = &self.shared.control;
        // From here the new process may read the state file: a change made here would
        // not reach it.
        control.freeze_for_handover().await;
        let completed =
            tokio::task::spawn_blocking(move || spawn(&executable, &args)?.complete(&offered))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let new_pid = match completed {
            Ok(pid) => pid,
            Err(e) => {
                control.thaw();
                return Err(e);
            }
        };
        drop(live);
        // The new process is this instance in the fleet now.
        control.leave_cluster().await;
        let _ = self.handover.send(true);
        Ok(crate::admin::Upgraded {
            old_pid: std::process::id(),
            new_pid,
            executable: info.executable.display().to_string(),
        })
    }
}
