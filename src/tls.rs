//! TLS with rustls: the listener's certificates (chosen by SNI, swapped in place on
//! reload), client-certificate verification, and the client side for upstream pools.
//!
//! Only the `ring` provider's defaults are offered: TLS 1.2 and 1.3 with AEAD suites and
//! ECDHE key exchange, so there is nothing legacy to switch off.

use std::collections::HashMap;
use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::{CertificatePaths, ClientAuth, MinVersion, UpstreamTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Rustls(String),
}

fn invalid(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The protocol versions from `min_version` up.
fn protocol_versions(min: MinVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min {
        MinVersion::Tls12 => &BOTH,
        MinVersion::Tls13 => &ONLY_13,
    }
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            path,
            "holds no PEM certificate (BEGIN CERTIFICATE)",
        ));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| invalid(path, format!("not a PEM key file: {e}")))?
        .ok_or_else(|| invalid(path, "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"))
}

/// One loaded certificate, with what the admin API and metrics show about it.
#[derive(Debug, Clone)]
pub struct CertificateInfo {
    pub cert_file: PathBuf,
    pub names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: Option<i64>,
}

/// The listener's certificates at one moment: looked up by exact name, then by
/// wildcard, then the first configured certificate as the default.
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    pub info: Vec<CertificateInfo>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("info", &self.info)
            .finish()
    }
}

impl CertStore {
    /// Reads and checks every pair: parseable, key matching the certificate.
    pub fn load(
        paths: &[CertificatePaths],
        provider: &CryptoProvider,
    ) -> Result<CertStore, TlsError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        let mut info = Vec::with_capacity(paths.len());
        for pair in paths {
            let chain = read_certs(&pair.cert)?;
            let key = read_key(&pair.key)?;
            let parsed = parse_certificate(&chain[0])
                .map_err(|m| invalid(&pair.cert, format!("cannot read the certificate: {m}")))?;
            let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
                invalid(
                    &pair.key,
                    format!("does not go with {}: {e}", pair.cert.display()),
                )
            })?;
            let certified = Arc::new(certified);
            for name in &parsed.dns_names {
                // The first certificate listed for a name wins, as with the default.
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard
                        .entry(suffix.to_string())
                        .or_insert_with(|| Arc::clone(&certified)),
                    None => exact
                        .entry(name.clone())
                        .or_insert_with(|| Arc::clone(&certified)),
                };
            }
            default.get_or_insert_with(|| Arc::clone(&certified));
            info.push(CertificateInfo {
                cert_file: pair.cert.clone(),
                names: parsed.dns_names,
                not_after: parsed.not_after,
            });
        }
        let default =
            default.ok_or_else(|| TlsError::Rustls("no certificate configured".into()))?;
        Ok(CertStore {
            exact,
            wildcard,
            default,
            info,
        })
    }

    pub fn lookup(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return Arc::clone(&self.default);
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return Arc::clone(found);
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(found) = self.wildcard.get(parent) {
                return Arc::clone(found);
            }
        }
        Arc::clone(&self.default)
    }
}

/// The listener's certificate resolver; `reload` swaps the whole store at once, so a
/// handshake sees either the old set or the new one, and open connections are untouched.
#[derive(Debug)]
pub struct Certificates {
    paths: Vec<CertificatePaths>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertStore>,
}

impl Certificates {
    pub fn load(paths: Vec<CertificatePaths>) -> Result<Certificates, TlsError> {
        let provider = provider();
        let store = CertStore::load(&paths, &provider)?;
        Ok(Certificates {
            paths,
            provider,
            current: ArcSwap::from_pointee(store),
        })
    }

    /// Reads the files again; on any error the certificates in use stay.
    pub fn reload(&self) -> Result<Arc<CertStore>, TlsError> {
        let store = Arc::new(CertStore::load(&self.paths, &self.provider)?);
        self.current.store(Arc::clone(&store));
        Ok(store)
    }

    pub fn current(&self) -> Arc<CertStore> {
        self.current.load_full()
    }

    pub fn paths(&self) -> &[CertificatePaths] {
        &self.paths
    }

    /// Modification times and sizes of every file, to notice a change without reading.
    pub fn file_stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths
            .iter()
            .flat_map(|p| [&p.cert, &p.key])
            .map(|path| {
                std::fs::metadata(path)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().lookup(client_hello.server_name()))
    }
}

/// The listener's rustls config; `client_verifier` from [`client_verifier`] when the
/// listener asks for client certificates.
pub fn server_config(
    certificates: Arc<Certificates>,
    min_version: MinVersion,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(protocol_versions(min_version))
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match client_verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut config = builder.with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Verifies client certificates against `auth.ca_file`.
pub fn client_verifier(
    auth: &ClientAuth,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let roots = Arc::new(root_store(&auth.ca_file)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let verifier = if auth.optional {
        verifier.allow_unauthenticated()
    } else {
        verifier
    };
    verifier
        .build()
        .map_err(|e| invalid(&auth.ca_file, e.to_string()))
}

fn root_store(ca_file: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| invalid(ca_file, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// TLS to one pool's backends.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// The name to send as SNI and verify; without it, the backend's IP address.
    pub server_name: Option<ServerName<'static>>,
    /// `insecure_skip_verify`: any certificate is accepted.
    pub unverified: bool,
}

/// What an upstream TLS setting could not be made of; `key` is the pool key it is about.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("{0}")]
    CaFile(TlsError),
    #[error("{0}")]
    ServerName(String),
    #[error("{0}")]
    ClientCert(TlsError),
}

impl UpstreamTlsError {
    pub fn key(&self) -> &'static str {
        match self {
            UpstreamTlsError::CaFile(_) => "ca_file",
            UpstreamTlsError::ServerName(_) => "server_name",
            UpstreamTlsError::ClientCert(_) => "client_cert_file",
        }
    }
}

/// Reads the files `settings` names and builds the client config; `h2` offers ALPN
/// `h2`, else `http/1.1`.
pub fn upstream_tls(
    settings: &UpstreamTlsConfig,
    h2: bool,
) -> Result<UpstreamTls, UpstreamTlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(protocol_versions(MinVersion::Tls12))
        .map_err(|e| UpstreamTlsError::CaFile(TlsError::Rustls(e.to_string())))?;
    let builder = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let roots = match &settings.ca_file {
            Some(path) => root_store(path).map_err(UpstreamTlsError::CaFile)?,
            None => {
                let mut roots = RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(UpstreamTlsError::CaFile(TlsError::Rustls(
                        "no ca_file given and no system CA certificates found".into(),
                    )));
                }
                roots
            }
        };
        builder.with_root_certificates(roots)
    };
    let mut config = match (&settings.client_cert_file, &settings.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert).map_err(UpstreamTlsError::ClientCert)?;
            let key_der = read_key(key).map_err(UpstreamTlsError::ClientCert)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| UpstreamTlsError::ClientCert(invalid(key, e.to_string())))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(UpstreamTlsError::ClientCert(TlsError::Rustls(
                "client_cert_file and client_key_file go together".into(),
            )))
        }
    };
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let server_name = match &settings.server_name {
        None => None,
        Some(name) => Some(
            ServerName::try_from(name.clone())
                .map_err(|e| UpstreamTlsError::ServerName(format!("`{name}`: {e}")))?,
        ),
    };
    Ok(UpstreamTls {
        config: Arc::new(config),
        server_name,
        unverified: settings.insecure_skip_verify,
    })
}

/// `insecure_skip_verify`: any certificate is accepted, but the handshake signatures
/// are still checked, so the session is at least bound to the key the server showed.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Watches the certificate files and reloads when one changes (new modification time
/// or size). A failed reload is reported once per change, not on every poll.
pub async fn watch_files(
    certificates: Arc<Certificates>,
    interval: Duration,
    on_reload: impl Fn(&Result<Arc<CertStore>, TlsError>) + Send + 'static,
) {
    let mut last_seen = certificates.file_stamps();
    loop {
        tokio::time::sleep(interval).await;
        let certs = Arc::clone(&certificates);
        let Ok(stamps) = tokio::task::spawn_blocking(move || certs.file_stamps()).await else {
            continue;
        };
        if stamps == last_seen {
            continue;
        }
        last_seen = stamps;
        let certs = Arc::clone(&certificates);
        if let Ok(result) = tokio::task::spawn_blocking(move || certs.reload()).await {
            on_reload(&result);
        }
    }
}

// ---------------------------------------------------------------------------------------
// A certificate's DNS names and expiry, which rustls does not expose: read with
// x509-parser (a maintained X.509 parser) rather than by hand.

struct ParsedCertificate {
    dns_names: Vec<String>,
    not_after: Option<i64>,
}

fn parse_certificate(der: &[u8]) -> Result<ParsedCertificate, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut dns_names = Vec::new();
    if let Some(names) = cert
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?
    {
        for name in &names.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(name) = name {
                dns_names.push(name.to_ascii_lowercase());
            }
        }
    }
    Ok(ParsedCertificate {
        dns_names,
        not_after: Some(cert.validity().not_after.timestamp()),
    })
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::generate_simple_self_signed(names).unwrap();
        (cert.cert.pem(), cert.key_pair.serialize_pem())
    }

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> CertificatePaths {
        let (cert, key) = self_signed(names);
        let paths = CertificatePaths {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&paths.cert, cert).unwrap();
        std::fs::write(&paths.key, key).unwrap();
        paths
    }

    #[test]
    fn names_and_expiry_are_read_from_the_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["App.Example.com".into(), "*.example.org".into()])
                .unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 9);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let parsed = parse_certificate(cert.der()).unwrap();
        assert_eq!(parsed.dns_names, ["app.example.com", "*.example.org"]);
        // 2031-07-09T00:00:00Z
        assert_eq!(parsed.not_after, Some(1_941_321_600));
    }

    #[test]
    fn exact_name_beats_wildcard_and_unknown_names_get_the_first_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let fallback = write_pair(dir.path(), "fallback", &["fallback.test"]);
        let wildcard = write_pair(dir.path(), "wild", &["*.example.com"]);
        let exact = write_pair(dir.path(), "exact", &["api.example.com"]);
        let store = CertStore::load(&[fallback, wildcard, exact], &provider()).unwrap();
        let cert_of = |sni: Option<&str>| store.lookup(sni).cert[0].clone();
        let names_of = |sni| parse_certificate(&cert_of(sni)).unwrap().dns_names;
        assert_eq!(names_of(Some("API.example.com.")), ["api.example.com"]);
        assert_eq!(names_of(Some("www.example.com")), ["*.example.com"]);
        // A wildcard covers one label only.
        assert_eq!(names_of(Some("a.b.example.com")), ["fallback.test"]);
        assert_eq!(names_of(None), ["fallback.test"]);
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = write_pair(dir.path(), "one", &["one.test"]);
        let two = write_pair(dir.path(), "two", &["two.test"]);
        let crossed = CertificatePaths {
            cert: one.cert,
            key: two.key,
        };
        let error = CertStore::load(&[crossed], &provider()).unwrap_err();
        assert!(error.to_string().contains("does not go with"), "{error}");
    }

    #[test]
    fn garbage_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let pair = write_pair(dir.path(), "ok", &["ok.test"]);
        std::fs::write(&pair.cert, "not a certificate").unwrap();
        let error = CertStore::load(std::slice::from_ref(&pair), &provider()).unwrap_err();
        assert!(error.to_string().contains("ok.pem"), "{error}");
    }
}
