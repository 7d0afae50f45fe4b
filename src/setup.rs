//! From a validated config to what serving needs from outside it: the files the config
//! names are read and the runtime objects built (the admin token, each pool's upstream
//! TLS client, the HTTPS listener's certificates and client verifier). `config` stays
//! data; `switchyard check` runs this step too, so a file that does not load is
//! reported there, with its config key and line, and not first at start.

use std::sync::Arc;

use crate::client::{Upstream, Upstreams};
use crate::config::{Config, ConfigError};
use crate::tls::Certificates;

/// A config with everything it names loaded: start (or a reload) can no longer fail on
/// a file.
#[derive(Debug)]
pub struct Setup {
    pub config: Config,
    /// The bearer token of the admin API, read from `admin.token_file`.
    pub admin_token: Option<String>,
    pub upstreams: Upstreams,
    pub listener_tls: Option<ListenerTls>,
}

/// The HTTPS listener's certificates (swapped in place on reload) and rustls config.
#[derive(Debug)]
pub struct ListenerTls {
    pub certificates: Arc<Certificates>,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl Setup {
    pub fn new(mut config: Config) -> Result<Setup, ConfigError> {
        let admin_token = admin_token(&config)?;
        let mut upstreams = Upstreams::with_capacity(config.pools.len());
        for pool in &config.pools {
            let upstream = Upstream::from_config(&pool.upstream).map_err(|e| {
                config
                    .origin
                    .error(&format!("pools.{}", pool.name), e.key(), e.to_string())
            })?;
            upstreams.insert(pool.name.clone(), upstream);
        }
        let listener_tls = listener_tls(&config)?;
        config.origin.forget_source();
        Ok(Setup {
            config,
            admin_token,
            upstreams,
            listener_tls,
        })
    }
}

fn admin_token(config: &Config) -> Result<Option<String>, ConfigError> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        config.origin.error(
            "admin",
            "token_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = text.trim().to_string();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(config.origin.error(
            "admin",
            "token_file",
            format!("{} must hold one token without spaces", path.display()),
        ));
    }
    Ok(Some(token))
}

fn listener_tls(config: &Config) -> Result<Option<ListenerTls>, ConfigError> {
    const TABLE: &str = "proxy.tls";
    let Some(tls) = &config.proxy.tls else {
        return Ok(None);
    };
    let certificates = Certificates::load(tls.certificates.clone())
        .map_err(|e| config.origin.error(TABLE, "certificates", e.to_string()))?;
    let verifier = match &tls.client_auth {
        None => None,
        Some(auth) => Some(
            crate::tls::client_verifier(auth)
                .map_err(|e| config.origin.error(TABLE, "client_ca_file", e.to_string()))?,
        ),
    };
    let certificates = Arc::new(certificates);
    let server_config =
        crate::tls::server_config(Arc::clone(&certificates), tls.min_version, verifier)
            .map_err(|e| config.origin.error(TABLE, "min_version", e.to_string()))?;
    Ok(Some(ListenerTls {
        certificates,
        server_config,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MINIMAL: &str =
        "[pools.blue]\nbackends = [\"127.0.0.1:9001\"]\n\n[services.app]\nactive = \"blue\"\n";

    fn setup(src: &str) -> Result<Setup, ConfigError> {
        Setup::new(Config::parse(src, Path::new("test.toml")).unwrap())
    }

    #[test]
    fn the_admin_token_is_read_from_its_file_and_a_missing_one_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        let src = format!(
            "[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"{}\"\n{MINIMAL}",
            token.display()
        );
        assert_eq!(
            setup(&src).unwrap().admin_token.as_deref(),
            Some("s3cret-token")
        );
        let missing = format!(
            "[admin]\ntoken_file = \"{}/nope\"\n{MINIMAL}",
            dir.path().display()
        );
        let e = setup(&missing).err().unwrap();
        assert_eq!(e.key, "admin.token_file");
        assert_eq!(e.line, Some(2));
        std::fs::write(&token, "two words\n").unwrap();
        let e = setup(&src).err().unwrap();
        assert!(e.message.contains("one token without spaces"), "{e}");
    }

    #[test]
    fn an_unreadable_ca_file_names_the_pool_key_and_its_line() {
        let src = MINIMAL.replace(
            "backends = [\"127.0.0.1:9001\"]",
            "backends = [\"127.0.0.1:9001\"]\ntls = true\nca_file = \"/nonexistent/ca.pem\"",
        );
        let e = setup(&src).err().unwrap();
        assert_eq!(e.key, "pools.blue.ca_file");
        assert_eq!(e.line, Some(4));
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn every_pool_gets_its_upstream() {
        let src =
            format!("{MINIMAL}[pools.grpc]\nbackends = [\"127.0.0.1:9002\"]\nprotocol = \"h2c\"\n");
        let built = setup(&src).unwrap();
        assert_eq!(built.upstreams.len(), 2);
        assert!(built.upstreams["grpc"].protocol.is_h2());
        assert!(built.upstreams["blue"].tls.is_none());
    }
}
