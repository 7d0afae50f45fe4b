//! What differs between two configs, key by key: the `changes` a reload answers with.
//! Backends are left to the caller, which knows the runtime membership that may hide
//! the file's list.

use serde::Serialize;

use super::{Config, PoolConfig};

/// One difference, named by its config key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ConfigChange {
    pub key: String,
    /// `added`, `removed`, `changed`, `dropped` (runtime state that no longer fits),
    /// `kept` (runtime state that wins over the file) or `needs_restart`.
    pub change: &'static str,
    pub detail: String,
}

impl ConfigChange {
    pub fn new(key: impl Into<String>, change: &'static str, detail: impl Into<String>) -> Self {
        ConfigChange {
            key: key.into(),
            change,
            detail: detail.into(),
        }
    }
}

/// Each `field` of two structs that differs, as `table.field changed: old -> new`.
macro_rules! changed_fields {
    ($out:ident, $table:expr, $old:expr, $new:expr, [$($field:ident),* $(,)?]) => {{
        $(
            if $old.$field != $new.$field {
                $out.push(ConfigChange::new(
                    format!("{}.{}", $table, stringify!($field)),
                    "changed",
                    format!("{:?} -> {:?}", $old.$field, $new.$field),
                ));
            }
        )*
    }};
}

impl Config {
    /// What `self` changes relative to `old`, except backend lists.
    pub fn changes_from(&self, old: &Config) -> Vec<ConfigChange> {
        let mut out = Vec::new();
        let (o, n) = (&old.proxy, &self.proxy);
        changed_fields!(
            out,
            "proxy",
            o,
            n,
            [
                listen,
                workers,
                connect_timeout,
                upstream_header_timeout,
                upstream_body_timeout,
                client_header_timeout,
                upstream_idle_timeout,
                connect_attempts,
                max_header_size,
                max_request_body,
                mirror_max_body,
                max_connections,
                shutdown_delay,
                shutdown_timeout,
                h2c,
                http2_max_concurrent_streams,
                http2_idle_timeout,
                client_body_timeout,
                send_timeout,
                max_backends_per_pool,
                hosts_file,
            ]
        );
        match (&o.tls, &n.tls) {
            (None, Some(_)) => out.push(ConfigChange::new("proxy.tls", "added", "HTTPS listener")),
            (Some(_), None) => {
                out.push(ConfigChange::new("proxy.tls", "removed", "HTTPS listener"))
            }
            (Some(ot), Some(nt)) => changed_fields!(
                out,
                "proxy.tls",
                ot,
                nt,
                [
                    listen,
                    certificates,
                    client_auth,
                    redirect_http,
                    redirect_port,
                    handshake_timeout,
                    max_handshakes,
                    reload_interval,
                    min_version,
                ]
            ),
            (None, None) => {}
        }
        let (oa, na) = (&old.admin, &self.admin);
        changed_fields!(
            out,
            "admin",
            oa,
            na,
            [listen, token_file, metrics_require_token]
        );
        changed_fields!(out, "state", old.state, self.state, [path]);
        changed_fields!(out, "log", old.log, self.log, [access, format, buffer]);
        changed_fields!(out, "metrics", old.metrics, self.metrics, [enabled]);
        if old.cluster != self.cluster {
            out.push(ConfigChange::new(
                "cluster",
                "changed",
                "[cluster] settings",
            ));
        }

        for pool in &self.pools {
            let table = format!("pools.{}", pool.name);
            match old.pools.iter().find(|p| p.name == pool.name) {
                None => out.push(ConfigChange::new(
                    table,
                    "added",
                    format!("{} backends", pool.backends.len()),
                )),
                Some(before) => pool_changes(&mut out, &table, before, pool),
            }
        }
        for pool in &old.pools {
            if !self.pools.iter().any(|p| p.name == pool.name) {
                out.push(ConfigChange::new(
                    format!("pools.{}", pool.name),
                    "removed",
                    "its backends drain: requests in flight finish",
                ));
            }
        }
        for service in &self.services {
            let table = format!("services.{}", service.name);
            match old.services.iter().find(|s| s.name == service.name) {
                None => out.push(ConfigChange::new(
                    table,
                    "added",
                    format!("active pool `{}`", service.active),
                )),
                Some(before) => {
                    changed_fields!(
                        out,
                        table,
                        before,
                        service,
                        [hosts, path_prefix, active, preview]
                    )
                }
            }
        }
        for service in &old.services {
            if !self.services.iter().any(|s| s.name == service.name) {
                out.push(ConfigChange::new(
                    format!("services.{}", service.name),
                    "removed",
                    "requests in flight finish",
                ));
            }
        }
        out
    }
}

fn pool_changes(out: &mut Vec<ConfigChange>, table: &str, old: &PoolConfig, new: &PoolConfig) {
    changed_fields!(
        out,
        table,
        old,
        new,
        [
            balance,
            health,
            passive,
            panic_mode,
            slow_start,
            upstream,
            dns_refresh
        ]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(src: &str) -> Config {
        Config::parse(src, Path::new("t.toml")).unwrap()
    }

    const BASE: &str =
        "[pools.blue]\nbackends = [\"127.0.0.1:9001\"]\n[services.app]\nactive = \"blue\"\n";

    #[test]
    fn an_identical_config_changes_nothing() {
        assert!(parse(BASE).changes_from(&parse(BASE)).is_empty());
    }

    #[test]
    fn each_difference_is_named_by_its_key() {
        let new = parse(&format!(
            "[proxy]\nconnect_timeout = \"3s\"\n{BASE}[pools.green]\nbackends = [\"127.0.0.1:9101\"]\nbalance = \"round_robin\"\n[services.api]\npath_prefix = \"/api\"\nactive = \"green\"\n"
        ));
        let changes = new.changes_from(&parse(BASE));
        let keys: Vec<(&str, &str)> = changes.iter().map(|c| (c.key.as_str(), c.change)).collect();
        assert_eq!(
            keys,
            [
                ("proxy.connect_timeout", "changed"),
                ("pools.green", "added"),
                ("services.api", "added"),
            ]
        );
        let back = parse(BASE).changes_from(&new);
        assert!(back.contains(&ConfigChange::new(
            "pools.green",
            "removed",
            "its backends drain: requests in flight finish"
        )));
        let health = parse(&format!("{BASE}[pools.blue.health]\ninterval = \"2s\"\n"));
        assert_eq!(
            health.changes_from(&parse(BASE))[0].key,
            "pools.blue.health"
        );
    }
}
