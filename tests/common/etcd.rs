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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    pub fn start() -> Etcd {
        let mut etcd = Etcd {
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            tls_args: Vec::new(),
            data: tempfile::tempdir().unwrap(),
            child: None,
        };
        etcd.resume();
        etcd
    }

    /// An etcd that serves TLS with `cert`/`key` and accepts only clients with a
    /// certificate from `ca`.
    pub fn start_tls(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> Etcd {
        let mut etcd = Etcd {
            client_url: format!("https://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            tls_args: vec![
                format!("--cert-file={}", cert.display()),
                format!("--key-file={}", key.display()),
                format!("--trusted-ca-file={}", ca.display()),
                "--client-cert-auth".into(),
            ],
            data: tempfile::tempdir().unwrap(),
            child: None,
        };
        etcd.resume();
        etcd
    }

    /// Starts the process (again), on the same ports and data, and waits until it
    /// answers.
    pub fn resume(&mut self) {
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
        self.child = Some(child);
        let tls = !self.tls_args.is_empty();
        let addr = self
            .client_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A TLS etcd is taken as up once it listens; switchyard's own connection
            // is what the test then checks.
            let healthy = if tls {
                std::net::TcpStream::connect(&addr).is_ok()
            } else {
                health(&addr)
            };
            if healthy {
                return;
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
