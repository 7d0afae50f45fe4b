//! Header hygiene for both directions, as pure functions: hop-by-hop headers stay on
//! their own hop, and the upstream learns who the client was.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Hop-by-hop headers (RFC 9110 7.6.1 plus the customary non-standard ones); `Connection`
/// itself is handled first, together with the names it lists.
const HOP_BY_HOP: [HeaderName; 7] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes `Connection`, every header it names, and the fixed hop-by-hop set.
/// `Upgrade` is removed too unless `keep_upgrade`, in which case `Connection: upgrade`
/// is put back so the next hop sees a valid upgrade request or 101 response.
/// `TE: trailers` survives, since gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the (few) names instead of a
    // hashed lookup per hop-by-hop header.
    let any = headers.keys().any(|name| {
        name == header::CONNECTION || name == header::UPGRADE || HOP_BY_HOP.contains(name)
    });
    if !any && !keep_upgrade {
        return;
    }
    let wants_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| list_contains(v, "trailers"));
    if headers.contains_key(header::CONNECTION) {
        // Copy the list out: the map cannot be read and changed at once. Only clients
        // that send `Connection` pay for this.
        let listed: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        headers.remove(header::CONNECTION);
        for name in listed {
            // `Connection: host` would take away what the request is routed by.
            if (keep_upgrade && name == "upgrade") || name == "host" {
                continue;
            }
            headers.remove(name.as_str());
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Why a request's host was refused (each is a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHost {
    /// HTTP/1.1 and HTTP/2 requests must name a host (RFC 9112 §3.2).
    Missing,
    /// More than one `Host` header: which one a backend reads is anyone's guess.
    Repeated,
    /// Not a host name, IP literal or port (spaces, `@`, `/`, quotes ...).
    Invalid,
}

/// The host a request is for, checked, without its port or a trailing dot: what the
/// request is routed by. The URI's authority (HTTP/2 `:authority`, or an absolute-form
/// request target) wins over the `Host` header, as RFC 9112 §3.2.2 requires of a
/// proxy, and the proxy forwards that same authority as `Host`. An HTTP/1.0 request
/// may have no host at all (empty: only a `*` service matches it).
pub fn request_host<B>(req: &http::Request<B>) -> Result<&str, BadHost> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header_value = hosts.next();
    if hosts.next().is_some() {
        return Err(BadHost::Repeated);
    }
    let authority = match req.uri().authority() {
        Some(authority) => authority.as_str(),
        None => match header_value {
            Some(value) => value.to_str().map_err(|_| BadHost::Invalid)?,
            None if req.version() == Version::HTTP_10 || req.version() == Version::HTTP_09 => {
                return Ok("")
            }
            None => return Err(BadHost::Missing),
        },
    };
    host_of_authority(authority)
}

/// `authority` (host and optional port, RFC 3986 without userinfo) checked, and its
/// host returned without the port and without one trailing dot.
fn host_of_authority(authority: &str) -> Result<&str, BadHost> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']').ok_or(BadHost::Invalid)?;
            let ipv6 = !inside.is_empty()
                && inside
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
            if !ipv6 {
                return Err(BadHost::Invalid);
            }
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(BadHost::Invalid)?),
            };
            (inside, port)
        }
        None => {
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            let host = host.strip_suffix('.').unwrap_or(host);
            if host.is_empty() || !is_host_name(host.as_bytes()) {
                return Err(BadHost::Invalid);
            }
            (host, port)
        }
    };
    if let Some(port) = port {
        if !is_port(port.as_bytes()) {
            return Err(BadHost::Invalid);
        }
    }
    Ok(host)
}

/// Letters, digits, `-`, `_` and dots between them: no leading dot, no empty label.
/// One pass over the bytes: this runs on every request.
fn is_host_name(host: &[u8]) -> bool {
    // A dot right at the start counts as following a dot.
    let mut after_dot = true;
    host.iter().all(|&b| {
        let ok = match b {
            b'.' => !after_dot,
            b'-' | b'_' => true,
            _ => b.is_ascii_alphanumeric(),
        };
        after_dot = b == b'.';
        ok
    })
}

/// Up to five digits, at most 65535; empty (`host:`) is accepted, as RFC 3986 allows.
fn is_port(port: &[u8]) -> bool {
    port.len() <= 5
        && port
            .iter()
            .try_fold(0u32, |n, &b| {
                b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
            })
            .is_some_and(|n| n <= 65535)
}

/// Is this request asking to switch protocols (WebSocket and the like)?
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    // `Upgrade: h2c` (curl --http2 on http://) is a hop-by-hop offer to this proxy, not
    // something to tunnel to a backend: it is dropped and the request served as is.
    headers
        .get(header::UPGRADE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"h2c"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| list_contains(v, "upgrade"))
}

fn list_contains(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// What the backend is told about a request's origin: the client's address, appended to
/// `X-Forwarded-For`; `X-Forwarded-Proto`; `X-Forwarded-Host`, the host the client asked
/// for; and this proxy, appended to `Via`. Kept beside the client's fields, not written
/// into them, until the request goes out: the HTTP/1.1 encoder writes these after the
/// client's fields (`replaces`, `write_h1_fields`), so the request's map neither grows
/// nor gets a joined value made for every request; `apply` puts them in the map, for
/// HTTP/2 backends and mirrored copies.
#[derive(Debug, Clone)]
pub struct Forwarded {
    client_ip: HeaderValue,
    tls: bool,
    /// `None`: the request named no host (HTTP/1.0). The client's `X-Forwarded-Host`
    /// is dropped all the same: a backend that builds links from it must not be handed a
    /// host this proxy never saw, and a request with no `Host` is the easy way to try.
    host: Option<HeaderValue>,
    version: Version,
}

/// Which of the list fields `Forwarded` extends the client sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct ListsSeen {
    forwarded_for: bool,
    via: bool,
}

impl Forwarded {
    pub fn new(
        client_ip: &HeaderValue,
        tls: bool,
        host: Option<HeaderValue>,
        version: Version,
    ) -> Forwarded {
        Forwarded {
            client_ip: client_ip.clone(),
            tls,
            host,
            version,
        }
    }

    fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    fn via(&self) -> &'static str {
        match self.version {
            Version::HTTP_10 => "1.0 switchyard",
            Version::HTTP_2 => "2 switchyard",
            _ => "1.1 switchyard",
        }
    }

    /// Sets the fields in `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        // At most four fields are added: one allocation instead of a regrowth midway.
        headers.reserve(4);
        append_to_list(headers, &X_FORWARDED_FOR, self.client_ip.clone());
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(self.proto()),
        );
        match &self.host {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST.clone(), host.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
        append_to_list(headers, &header::VIA, HeaderValue::from_static(self.via()));
    }

    /// Whether the client's field `name` is left out of the request as it goes out,
    /// because `write_h1_fields` writes it: replaced (`X-Forwarded-Proto`,
    /// `X-Forwarded-Host`, left out when there is no host) or extended
    /// (`X-Forwarded-For` and `Via`, noted in `seen`).
    pub fn replaces(&self, name: &HeaderName, seen: &mut ListsSeen) -> bool {
        if name == header::VIA {
            seen.via = true;
            return true;
        }
        if *name == X_FORWARDED_FOR {
            seen.forwarded_for = true;
            return true;
        }
        *name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST
    }

    /// The fields as HTTP/1.1 field lines, the client's lines of the list fields (as
    /// `replaces` saw them) joined in front of this proxy's item.
    pub fn write_h1_fields(&self, headers: &HeaderMap, seen: ListsSeen, out: &mut Vec<u8>) {
        out.extend_from_slice(b"x-forwarded-for: ");
        let client = self.client_ip.as_bytes();
        if seen.forwarded_for {
            join_list(out, headers.get_all(&X_FORWARDED_FOR).iter(), client);
        } else {
            out.extend_from_slice(client);
        }
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(self.proto().as_bytes());
        if let Some(host) = &self.host {
            out.extend_from_slice(b"\r\nx-forwarded-host: ");
            out.extend_from_slice(host.as_bytes());
        }
        out.extend_from_slice(b"\r\nvia: ");
        let via = self.via().as_bytes();
        if seen.via {
            join_list(out, headers.get_all(header::VIA).iter(), via);
        } else {
            out.extend_from_slice(via);
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// The client's address as an `X-Forwarded-For` item: made once per connection, then
/// each request's header shares it.
pub fn forwarded_for_value(client: IpAddr) -> HeaderValue {
    // An IP address's text is always a valid header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(client.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Appends `item` to a list header: its existing lines become one, `item` last. One
/// lookup of the name, found or not.
fn append_to_list(headers: &mut HeaderMap, name: &HeaderName, item: HeaderValue) {
    let mut existing = match headers.entry(name) {
        Entry::Vacant(slot) => {
            slot.insert(item);
            return;
        }
        Entry::Occupied(existing) => existing,
    };
    let mut joined = Vec::with_capacity(64);
    join_list(&mut joined, existing.iter(), item.as_bytes());
    // Existing values were valid header bytes, and so are the separator and the item.
    existing
        .insert(HeaderValue::from_bytes(&joined).unwrap_or_else(|_| HeaderValue::from_static("")));
}

/// `existing` (at least one line) joined with ", ", then `item`; a line that starts it
/// empty adds no separator.
fn join_list<'a>(out: &mut Vec<u8>, existing: impl Iterator<Item = &'a HeaderValue>, item: &[u8]) {
    let start = out.len();
    for value in existing {
        if out.len() > start {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(b", ");
    out.extend_from_slice(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn connection_and_the_headers_it_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("connection").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get("x-kept").unwrap(), "yes");
    }

    #[test]
    fn fixed_hop_by_hop_headers_are_removed_even_when_not_listed() {
        let mut h = map(&[
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "left: {h:?}");
    }

    #[test]
    fn te_trailers_is_kept_for_grpc() {
        let mut h = map(&[("te", "trailers, gzip")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("te").unwrap(), "trailers");
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_a_clean_connection_header() {
        let mut h = map(&[
            ("connection", "Upgrade, x-private"),
            ("upgrade", "websocket"),
            ("x-private", "1"),
        ]);
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert!(h.get("x-private").is_none());
    }

    #[test]
    fn x_forwarded_for_is_appended_to_an_existing_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        Forwarded::new(
            &forwarded_for_value("192.0.2.7".parse().unwrap()),
            false,
            None,
            Version::HTTP_11,
        )
        .apply(&mut h);
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "10.0.0.1, 10.0.0.2, 192.0.2.7"
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn forwarded_headers_are_set_for_a_fresh_request() {
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_static("shop.example.com");
        Forwarded::new(
            &forwarded_for_value("::1".parse().unwrap()),
            true,
            Some(host),
            Version::HTTP_11,
        )
        .apply(&mut h);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "::1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "shop.example.com");
        assert_eq!(h.get("via").unwrap(), "1.1 switchyard");
    }

    #[test]
    fn via_is_appended_after_earlier_proxies() {
        let mut h = map(&[("via", "1.1 edge")]);
        Forwarded::new(
            &forwarded_for_value("127.0.0.1".parse().unwrap()),
            false,
            None,
            Version::HTTP_10,
        )
        .apply(&mut h);
        assert_eq!(h.get("via").unwrap(), "1.1 edge, 1.0 switchyard");
    }

    fn host_of(req: http::request::Builder) -> Result<String, BadHost> {
        let req = req.body(()).unwrap();
        request_host(&req).map(str::to_string)
    }

    #[test]
    fn the_host_comes_from_the_single_host_header_without_port_or_trailing_dot() {
        let get = || http::Request::get("/x");
        assert_eq!(
            host_of(get().header("host", "app.example:8080")).unwrap(),
            "app.example"
        );
        assert_eq!(
            host_of(get().header("host", "internal.example.")).unwrap(),
            "internal.example"
        );
        assert_eq!(host_of(get().header("host", "[::1]:80")).unwrap(), "::1");
        assert_eq!(
            host_of(get().header("host", "10.0.0.1")).unwrap(),
            "10.0.0.1"
        );
        assert_eq!(
            host_of(get()),
            Err(BadHost::Missing),
            "HTTP/1.1 needs a host"
        );
        assert_eq!(host_of(get().version(Version::HTTP_10)).unwrap(), "");
        let two = get()
            .header("host", "a.example")
            .header("host", "b.example");
        assert_eq!(host_of(two), Err(BadHost::Repeated));
    }

    #[test]
    fn hosts_that_are_not_host_names_are_refused() {
        for bad in [
            "a b/c@d\"<>",
            "user@evil.example",
            "evil.example/x",
            "",
            ".",
            "a..b",
            ".a",
            "a:99999",
            "a:8o",
            "[::1",
            "[zz]",
            "[::1]x",
            "a\\b",
        ] {
            let req = http::Request::get("/").header("host", bad);
            assert_eq!(host_of(req), Err(BadHost::Invalid), "{bad:?}");
        }
    }

    /// The checks as first written, one rule per line, for the one-pass version to be
    /// compared against.
    fn host_of_authority_by_rules(authority: &str) -> Result<&str, BadHost> {
        if authority.starts_with('[') {
            return host_of_authority(authority);
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let name = !host.is_empty()
            && !host.starts_with('.')
            && !host.contains("..")
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        let port_ok = port.is_none_or(|port| {
            port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && !port.parse::<u32>().is_ok_and(|p| p > 65535)
        });
        if name && port_ok {
            Ok(host)
        } else {
            Err(BadHost::Invalid)
        }
    }

    #[test]
    fn the_one_pass_host_check_agrees_with_the_rules_on_every_short_authority() {
        let alphabet = ['a', 'Z', '7', '.', '-', '_', ':', ' ', '@', '/'];
        let mut checked = 0;
        let mut authority = String::new();
        for len in 0..=5u32 {
            for mut n in 0..alphabet.len().pow(len) {
                authority.clear();
                for _ in 0..len {
                    authority.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                assert_eq!(
                    host_of_authority(&authority),
                    host_of_authority_by_rules(&authority),
                    "{authority:?}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 111_111);
        for port in ["0", "65535", "65536", "99999", "100000", "080", ""] {
            let authority = format!("app.example:{port}");
            assert_eq!(
                host_of_authority(&authority),
                host_of_authority_by_rules(&authority),
                "{authority:?}"
            );
        }
    }

    #[test]
    fn the_uri_authority_wins_over_the_host_header() {
        let req = http::Request::get("http://public.example/x").header("host", "internal.example");
        assert_eq!(host_of(req).unwrap(), "public.example");
        let req = http::Request::get("http://user@evil.example/x");
        assert_eq!(host_of(req), Err(BadHost::Invalid));
    }

    #[test]
    fn connection_cannot_name_the_host_away() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::HOST], "app.example");
        assert!(!h.contains_key("x-secret"));
    }
}
