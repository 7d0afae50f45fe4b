//! Certificates made at run time (rcgen), a TLS client that reports what it negotiated,
//! and a TLS app server for upstream tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use super::{full, Answer, TestBody};

/// A private certificate authority.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A PEM certificate and key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> Issued {
        self.issue_with(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    pub fn issue_client(&self, name: &str) -> Issued {
        self.issue_with(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue_with(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        roots
    }
}

impl Issued {
    /// Writes `<stem>.pem` and `<stem>.key`; returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    pub fn chain_and_key(
        &self,
    ) -> (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        (vec![self.der.clone()], key)
    }
}

/// The `[proxy.tls]` table for one certificate per `(cert, key)` pair.
pub fn tls_table(pairs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let list: Vec<String> = pairs
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.display(),
                k.display()
            )
        })
        .collect();
    format!(
        "[proxy.tls]\nlisten = \"127.0.0.1:0\"\ncertificates = [{}]\n{extra}\n",
        list.join(", ")
    )
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client-side TLS settings for one connection.
pub struct TlsClient {
    pub roots: rustls::RootCertStore,
    pub alpn: Vec<Vec<u8>>,
    pub client_cert: Option<Issued>,
    pub versions: &'static [&'static rustls::SupportedProtocolVersion],
}

impl TlsClient {
    pub fn new(ca: &TestCa, alpn: &[&str]) -> TlsClient {
        TlsClient {
            roots: ca.roots(),
            alpn: alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
            client_cert: None,
            versions: rustls::ALL_VERSIONS,
        }
    }

    fn config(&self) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(self.versions)
            .unwrap()
            .with_root_certificates(self.roots.clone());
        let mut config = match &self.client_cert {
            Some(cert) => {
                let (chain, key) = cert.chain_and_key();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Arc::new(config)
    }

    pub async fn connect(
        &self,
        addr: SocketAddr,
        sni: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(sni.to_string()).unwrap();
        tokio_rustls::TlsConnector::from(self.config())
            .connect(name, tcp)
            .await
    }
}

/// An open HTTPS connection to the proxy, speaking what ALPN chose.
pub struct Session {
    pub alpn: Option<Vec<u8>>,
    pub peer_cert: CertificateDer<'static>,
    sender: Sender,
    host: String,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

impl Session {
    pub async fn open(client: &TlsClient, addr: SocketAddr, sni: &str) -> std::io::Result<Session> {
        let stream = client.connect(addr, sni).await?;
        let (_, conn) = stream.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let peer_cert = conn.peer_certificates().unwrap()[0].clone();
        let io = TokioIo::new(stream);
        let sender = if alpn.as_deref() == Some(b"h2") {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        Ok(Session {
            alpn,
            peer_cert,
            sender,
            host: sni.to_string(),
        })
    }

    pub async fn get(&mut self, path: &str) -> Result<Answer, hyper::Error> {
        let uri = format!("https://{}{path}", self.host);
        let response = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                let req = Request::get(path)
                    .header("host", &self.host)
                    .body(super::empty())
                    .unwrap();
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                let req = Request::get(uri)
                    .version(http::Version::HTTP_2)
                    .body(super::empty())
                    .unwrap();
                s.send_request(req).await?
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

/// An HTTPS app server (HTTP/1.1 and HTTP/2 by ALPN) answering every request with
/// `tls-upstream <version> client-cert=<yes|no>`.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    /// Connections open to it now.
    open: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    /// `client_ca`: require client certificates issued by it.
    pub async fn start(server: &Issued, client_ca: Option<&TestCa>) -> TlsUpstream {
        TlsUpstream::serve(server, client_ca, false).await
    }

    /// On one port, HTTPS as `start` but with client certificates optional (issued by
    /// `client_ca`), and plain HTTP answered `plain-upstream <version>` (`/slow` after
    /// 300 ms): a backend
    /// a pool can be switched to and from TLS on, at the same address.
    pub async fn start_plain_too(server: &Issued, client_ca: &TestCa) -> TlsUpstream {
        TlsUpstream::serve(server, Some(client_ca), true).await
    }

    async fn serve(server: &Issued, client_ca: Option<&TestCa>, plain_too: bool) -> TlsUpstream {
        let (chain, key) = server.chain_and_key();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(ca.roots()),
                    provider(),
                );
                let verifier = if plain_too {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(verifier.build().unwrap())
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&open);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let open = OpenConnection::new(&counted);
                tokio::spawn(async move {
                    let _open = open;
                    let mut first = [0u8; 1];
                    // A TLS record starts with 22 (handshake).
                    let tls = !plain_too
                        || matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 22);
                    if !tls {
                        let service = service_fn(|req: Request<Incoming>| async move {
                            // `/slow`: answered after 300 ms, so that concurrent requests
                            // each need a connection of their own.
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            }
                            let text = format!("plain-upstream {:?}", req.version());
                            Ok::<_, std::convert::Infallible>(Response::new(full(Bytes::from(
                                text,
                            ))))
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        return;
                    }
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let with_cert = stream.get_ref().1.peer_certificates().is_some();
                    let service = service_fn(move |req: Request<Incoming>| async move {
                        let text = format!(
                            "tls-upstream {:?} client-cert={}",
                            req.version(),
                            if with_cert { "yes" } else { "no" }
                        );
                        let mut response = Response::new(full(Bytes::from(text)));
                        *response.status_mut() = StatusCode::OK;
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TlsUpstream { addr, open, task }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Counts a connection as open until it is dropped.
struct OpenConnection(Arc<std::sync::atomic::AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<std::sync::atomic::AtomicUsize>) -> OpenConnection {
        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpenConnection(Arc::clone(open))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The files a pool needs to speak TLS to a test upstream: a CA whose
/// `backend.test` certificate the upstream serves, and a client certificate from a
/// second CA that the upstream can ask for.
pub struct UpstreamTlsFiles {
    pub ca: TestCa,
    pub client_ca: TestCa,
    ca_file: PathBuf,
    client_cert: (PathBuf, PathBuf),
    _dir: tempfile::TempDir,
}

impl UpstreamTlsFiles {
    pub fn new() -> UpstreamTlsFiles {
        let ca = TestCa::new("private CA");
        let client_ca = TestCa::new("client CA");
        let dir = tempfile::tempdir().unwrap();
        let ca_file = ca.write(dir.path());
        let client_cert = client_ca
            .issue_client("switchyard")
            .write(dir.path(), "client");
        UpstreamTlsFiles {
            ca,
            client_ca,
            ca_file,
            client_cert,
            _dir: dir,
        }
    }

    /// The upstream's certificate, for `backend.test`.
    pub fn server_cert(&self) -> Issued {
        self.ca.issue(&["backend.test"])
    }

    /// Pool keys: TLS to `backend.test`, verified against the CA.
    pub fn pool_keys(&self) -> String {
        format!(
            "tls = true\nca_file = \"{}\"\nserver_name = \"backend.test\"",
            self.ca_file.display()
        )
    }

    /// `pool_keys` with the client certificate to present.
    pub fn pool_keys_with_client_cert(&self) -> String {
        let (cert, key) = &self.client_cert;
        format!(
            "{}\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
            self.pool_keys(),
            cert.display(),
            key.display()
        )
    }
}
