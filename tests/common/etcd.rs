//! A real etcd (Debian `etcd-server`) for the fleet tests: one member on free loopback
//! ports with a temporary data directory, stopped when dropped. It can be killed and
//! started again on the same ports and data.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    pub client_url: String,
    peer_url: String,
    /// `--cert-file` and the like, for an etcd that serves TLS and wants client
    /// certificates.
    tls_args: Vec<String>,
    data: tempfile::TempDir,
    child: Option<Child>,
}

/// Ports for an etcd are taken below the kernel's ephemeral range (32768 and up), so no
/// other test's `bind(0)` or outgoing connection can take one between the check here and
/// etcd's bind, or while a test has its etcd killed. Another etcd can still draw the
/// same port; `start` sees that and draws again.
fn unused_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        // A fresh RandomState is keyed anew: a random draw without a rand crate.
        let hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let port = 20_000 + (hasher.finish() % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Attempts at starting an etcd on ports that turn out to be taken.
const START_ATTEMPTS: usize = 5;

enum Started {
    Up,
    /// The process ended, or another process holds the client port.
    PortTaken(String),
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_on_unused_ports("http", Vec::new())
    }

    /// An etcd that serves TLS with `cert`/`key` and accepts only clients with a
    /// certificate from `ca`.
    pub fn start_tls(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> Etcd {
        let tls_args = vec![
            format!("--cert-file={}", cert.display()),
            format!("--key-file={}", key.display()),
            format!("--trusted-ca-file={}", ca.display()),
            "--client-cert-auth".into(),
        ];
        Etcd::start_on_unused_ports("https", tls_args)
    }

    fn start_on_unused_ports(scheme: &str, tls_args: Vec<String>) -> Etcd {
        let mut why = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let mut etcd = Etcd {
                client_url: format!("{scheme}://127.0.0.1:{}", unused_port()),
                peer_url: format!("http://127.0.0.1:{}", unused_port()),
                tls_args: tls_args.clone(),
                data: tempfile::tempdir().unwrap(),
                child: None,
            };
            match etcd.try_resume() {
                Started::Up => return etcd,
                Started::PortTaken(reason) => why.push(reason),
            }
        }
        panic!("etcd did not start: {why:?}");
    }

    /// Starts the process again, on the same ports and data, and waits until it
    /// answers.
    pub fn resume(&mut self) {
        if let Started::PortTaken(reason) = self.try_resume() {
            panic!("etcd did not start again: {reason}");
        }
    }

    fn try_resume(&mut self) -> Started {
        let child = Command::new("etcd")
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("test={}", self.peer_url)])
            .args(&self.tls_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "etcd is needed for this test (Debian package `etcd-server`; .ci/run installs it)",
            );
        let pid = child.id();
        self.child = Some(child);
        let tls = !self.tls_args.is_empty();
        let addr = self
            .client_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Started::PortTaken(format!("etcd on {addr} exited: {status}"));
            }
            // Whatever answers must be this etcd, not one another test started on the
            // same port. A TLS etcd is taken as up once it listens; switchyard's own
            // connection is what the test then checks.
            if holds_listener(pid, port) {
                if tls || health(&addr) {
                    return Started::Up;
                }
            } else if std::net::TcpStream::connect(&addr).is_ok() && !holds_listener(pid, port) {
                // Someone else listens there; this etcd will fail its bind and exit.
                self.kill();
                return Started::PortTaken(format!("another process listens on {addr}"));
            }
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.data.path().join("etcd")
    }

    /// SIGKILL: etcd is gone until `resume`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.client_url])
            .args(args)
            .output()
            .expect("etcdctl is needed (Debian package `etcd-client`)")
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`: the socket's
/// inode from `/proc/net/tcp`, among the process's descriptors.
fn holds_listener(pid: u32, port: u16) -> bool {
    const LISTEN: &str = "0A";
    let local = format!("0100007F:{port:04X}");
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening =
                fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&LISTEN);
            let inode = fields.get(9).filter(|_| listening)?;
            Some(format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(descriptors) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    descriptors.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| {
                inodes
                    .iter()
                    .any(|inode| target.as_os_str() == inode.as_str())
            })
            .unwrap_or(false)
    })
}

/// `GET /health` answers `"health":"true"`.
fn health(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
