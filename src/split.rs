//! The per-request canary decision, as pure functions over the request headers.
//!
//! Precedence: an override header or cookie sends the request to the canary; else a
//! sticky key (hashed into 0..10000) is compared with the weight, so a user keeps their
//! pool and, as the weight grows, only moves *into* the canary; else a per-thread random
//! draw. Weights are basis points (10% = 1000).

use http::header::{HeaderMap, HeaderName, HeaderValue, COOKIE};

use crate::random;

pub const FULL_WEIGHT: u32 = 10_000;

/// Why a request went where it went (for access logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No canary configured: the active pool.
    Active,
    Header,
    Cookie,
    Sticky,
    Weight,
    /// The service's preview header named this pool.
    Preview,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Active => "active",
            Reason::Header => "header",
            Reason::Cookie => "cookie",
            Reason::Sticky => "sticky",
            Reason::Weight => "weight",
            Reason::Preview => "preview",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    Header(HeaderName),
    Cookie(Box<str>),
}

impl StickyKey {
    /// Parses `header:NAME` or `cookie:NAME`.
    pub fn parse(text: &str) -> Result<StickyKey, String> {
        let bad = || format!("sticky must be \"header:NAME\" or \"cookie:NAME\", got `{text}`");
        let (kind, name) = text.split_once(':').ok_or_else(bad)?;
        match kind {
            "header" => HeaderName::from_bytes(name.trim().as_bytes())
                .map(StickyKey::Header)
                .map_err(|_| format!("`{name}` is not a valid header name")),
            "cookie" if is_cookie_token(name) => Ok(StickyKey::Cookie(name.into())),
            "cookie" => Err(format!("`{name}` is not a valid cookie name")),
            _ => Err(bad()),
        }
    }
}

/// A validated canary split, ready for the request path.
#[derive(Debug, Clone)]
pub struct Split {
    pub weight: u32,
    pub header: Option<(HeaderName, HeaderValue)>,
    pub cookie: Option<(Box<str>, Box<str>)>,
    pub sticky: Option<StickyKey>,
}

impl Split {
    /// True when this request goes to the canary pool, and why.
    pub fn to_canary(&self, headers: &HeaderMap) -> (bool, Reason) {
        if let Some((name, value)) = &self.header {
            if headers.get_all(name).iter().any(|v| v == value) {
                return (true, Reason::Header);
            }
        }
        if let Some((name, value)) = &self.cookie {
            if cookie_value(headers, name) == Some(value.as_bytes()) {
                return (true, Reason::Cookie);
            }
        }
        if let Some(key) = &self.sticky {
            let value = match key {
                StickyKey::Header(name) => headers.get(name).map(HeaderValue::as_bytes),
                StickyKey::Cookie(name) => cookie_value(headers, name),
            };
            if let Some(value) = value {
                return (sticky_bucket(value) < self.weight, Reason::Sticky);
            }
        }
        let draw = match self.weight {
            0 => return (false, Reason::Weight),
            FULL_WEIGHT.. => return (true, Reason::Weight),
            _ => random::below(u64::from(FULL_WEIGHT)) as u32,
        };
        (draw < self.weight, Reason::Weight)
    }
}

/// A stable bucket in 0..10000 for a sticky key: FNV-1a, then a 64-bit finaliser so
/// similar keys spread. Stable across processes and restarts, so a user keeps their pool.
pub fn sticky_bucket(key: &[u8]) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in key {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    ((u128::from(hash) * u128::from(FULL_WEIGHT)) >> 64) as u32
}

/// The value of cookie `name` in the request's `Cookie` headers, without allocating.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    for header in headers.get_all(COOKIE) {
        for pair in header.as_bytes().split(|&b| b == b';') {
            let pair = trim(pair);
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if trim(&pair[..eq]) == name.as_bytes() {
                let value = trim(&pair[eq + 1..]);
                let value = value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value);
                return Some(value);
            }
        }
    }
    None
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// RFC 6265 cookie-name (an HTTP token).
pub fn is_cookie_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// RFC 6265 cookie-value characters (without quotes).
pub fn is_cookie_value(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(weight: u32) -> Split {
        Split {
            weight,
            header: None,
            cookie: None,
            sticky: None,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn random_split_is_within_half_a_point_over_100k_requests() {
        for weight in [500, 1000, 2500, 5000] {
            let s = split(weight);
            let empty = HeaderMap::new();
            let canary = (0..100_000).filter(|_| s.to_canary(&empty).0).count();
            let share = canary as f64 / 1000.0; // percent
            let expected = f64::from(weight) / 100.0;
            assert!(
                (share - expected).abs() < 0.5,
                "weight {expected}%: measured {share}%"
            );
        }
    }

    #[test]
    fn zero_and_full_weight_are_exact() {
        let empty = HeaderMap::new();
        assert!((0..10_000).all(|_| !split(0).to_canary(&empty).0));
        assert!((0..10_000).all(|_| split(FULL_WEIGHT).to_canary(&empty).0));
    }

    #[test]
    fn an_override_header_sends_to_the_canary_even_at_weight_zero() {
        let mut s = split(0);
        s.header = Some((
            HeaderName::from_static("x-canary"),
            HeaderValue::from_static("1"),
        ));
        assert_eq!(
            s.to_canary(&headers(&[("x-canary", "1")])),
            (true, Reason::Header)
        );
        assert!(!s.to_canary(&headers(&[("x-canary", "2")])).0);
    }

    #[test]
    fn an_override_cookie_sends_to_the_canary() {
        let mut s = split(0);
        s.cookie = Some(("canary".into(), "yes".into()));
        let h = headers(&[("cookie", "session=abc; canary=yes"), ("cookie", "other=1")]);
        assert_eq!(s.to_canary(&h), (true, Reason::Cookie));
        assert!(!s.to_canary(&headers(&[("cookie", "canary=no")])).0);
        assert!(!s.to_canary(&headers(&[("cookie", "xcanary=yes")])).0);
    }

    #[test]
    fn a_sticky_user_keeps_their_pool() {
        let mut s = split(3000);
        s.sticky = Some(StickyKey::parse("header:x-user-id").unwrap());
        for user in 0..200 {
            let h = headers(&[("x-user-id", &format!("user-{user}"))]);
            let first = s.to_canary(&h);
            assert_eq!(first.1, Reason::Sticky);
            assert!((0..20).all(|_| s.to_canary(&h) == first));
        }
    }

    #[test]
    fn sticky_users_only_move_into_the_canary_as_the_weight_grows() {
        let users: Vec<String> = (0..5000).map(|i| format!("session-{i}")).collect();
        let mut previous = vec![false; users.len()];
        for weight in [1000, 2000, 3000, 4000] {
            let mut s = split(weight);
            s.sticky = Some(StickyKey::parse("cookie:session").unwrap());
            let mut in_canary = 0;
            for (i, user) in users.iter().enumerate() {
                let h = headers(&[("cookie", &format!("session={user}"))]);
                let now = s.to_canary(&h).0;
                assert!(
                    !previous[i] || now,
                    "user {user} left the canary at {weight}"
                );
                previous[i] = now;
                in_canary += usize::from(now);
            }
            let share = in_canary as f64 / users.len() as f64 * 100.0;
            let expected = f64::from(weight) / 100.0;
            assert!((share - expected).abs() < 2.5, "{expected}%: {share}%");
        }
    }

    #[test]
    fn without_the_sticky_key_the_draw_is_random() {
        let mut s = split(5000);
        s.sticky = Some(StickyKey::parse("header:x-user-id").unwrap());
        assert_eq!(s.to_canary(&HeaderMap::new()).1, Reason::Weight);
    }

    #[test]
    fn sticky_buckets_are_stable_known_values() {
        // Pinned so a change of hash (which would move users between pools on upgrade)
        // is a deliberate decision. The values were computed apart from this code (FNV-1a
        // then MurmurHash3's fmix64, scaled to 0..10000).
        assert_eq!(sticky_bucket(b"user-1"), 2563);
        assert_eq!(sticky_bucket(b"user-2"), 6638);
        assert_eq!(sticky_bucket(b""), 9367);
        assert_eq!(sticky_bucket(b"session-4f2a9c"), 9083);
    }

    #[test]
    fn sticky_keys_parse_or_explain() {
        assert!(matches!(
            StickyKey::parse("header:X-User"),
            Ok(StickyKey::Header(_))
        ));
        assert!(matches!(
            StickyKey::parse("cookie:sid"),
            Ok(StickyKey::Cookie(_))
        ));
        assert!(StickyKey::parse("ip").is_err());
        assert!(StickyKey::parse("cookie:a b").is_err());
    }

    #[test]
    fn cookie_values_may_be_quoted_and_spaced() {
        let h = headers(&[("cookie", " a = 1 ;b=\"two\"")]);
        assert_eq!(cookie_value(&h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie_value(&h, "b"), Some(&b"two"[..]));
        assert_eq!(cookie_value(&h, "c"), None);
    }
}
