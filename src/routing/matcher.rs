//! Finds a request's service in time that does not grow with the number of services:
//! exact host names and `*.suffix` patterns in hash maps, and under each host pattern
//! its services' path prefixes grouped by length, so the longest match is a few hash
//! lookups whatever the table holds. The order of precedence is the linear scan's
//! (see `RoutingTable::route`): the most specific host first (an exact name, then the
//! longest suffix, then `*`), and under it the longest path prefix; equal candidates go
//! to the service listed first.

use std::collections::HashMap;

use crate::config::HostMatch;

/// Longer host names than this are lowercased on the heap (a client may send one; no
/// valid DNS name is longer than 253 bytes, so it can only match a suffix or `*`).
const STACK_HOST: usize = 255;

/// Path prefixes of one host pattern, longest first.
#[derive(Debug, Default)]
struct Prefixes {
    groups: Vec<PrefixGroup>,
}

/// The prefixes of one length: a few are compared in turn, more are hashed.
#[derive(Debug)]
struct PrefixGroup {
    len: usize,
    few: Vec<(Box<[u8]>, u32)>,
    /// Boxed: most groups never have more than `FEW`, and there is one group per host
    /// name at least: a word each, where an empty map inline would be six.
    #[allow(clippy::box_collection)]
    many: Option<Box<HashMap<Box<[u8]>, u32>>>,
}

/// Up to this many prefixes of one length are compared without hashing.
const FEW: usize = 4;

impl Prefixes {
    /// Keeps the first service given for a prefix: a later one with the same host
    /// pattern and prefix could never be chosen by the linear scan either.
    fn insert(&mut self, prefix: &str, service: u32) {
        let len = prefix.len();
        let at = self.groups.partition_point(|g| g.len > len);
        if self.groups.get(at).is_none_or(|g| g.len != len) {
            // Exact sizes: a host has one group and one prefix far more often than not,
            // and a doubling Vec would hold room for four of each, per host.
            self.groups.reserve_exact(1);
            self.groups.insert(
                at,
                PrefixGroup {
                    len,
                    few: Vec::new(),
                    many: None,
                },
            );
        }
        let group = &mut self.groups[at];
        let key = prefix.as_bytes();
        if let Some(map) = &mut group.many {
            map.entry(key.into()).or_insert(service);
        } else if !group.few.iter().any(|(p, _)| &**p == key) {
            group.few.reserve_exact(1);
            group.few.push((key.into(), service));
            if group.few.len() > FEW {
                let mut map = HashMap::with_capacity(group.few.len());
                for (p, s) in std::mem::take(&mut group.few) {
                    map.insert(p, s);
                }
                group.many = Some(Box::new(map));
            }
        }
    }

    fn longest(&self, path: &[u8]) -> Option<u32> {
        for group in &self.groups {
            let Some(head) = path.get(..group.len) else {
                continue;
            };
            let found = match &group.many {
                Some(map) => map.get(head).copied(),
                None => group
                    .few
                    .iter()
                    .find(|(p, _)| **p == *head)
                    .map(|(_, s)| *s),
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// The index over a table's services, by their position in it.
#[derive(Debug, Default)]
pub struct RouteIndex {
    exact: HashMap<Box<[u8]>, Prefixes>,
    /// Keyed by the suffix with its leading dot (`.example.com`).
    suffix: HashMap<Box<[u8]>, Prefixes>,
    /// Lengths of the suffixes present, longest first: only those are looked up.
    suffix_lens: Vec<usize>,
    any: Prefixes,
}

impl RouteIndex {
    /// `services` yields each service's host patterns and path prefix, in table order.
    pub fn new<'a>(services: impl IntoIterator<Item = (&'a [HostMatch], &'a str)>) -> RouteIndex {
        let mut index = RouteIndex::default();
        for (position, (hosts, prefix)) in services.into_iter().enumerate() {
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            for host in hosts {
                // Config hosts are lowercase already (see `HostMatch::parse`).
                match host {
                    HostMatch::Any => index.any.insert(prefix, position),
                    HostMatch::Exact(name) => index
                        .exact
                        .entry(name.as_bytes().into())
                        .or_default()
                        .insert(prefix, position),
                    HostMatch::Suffix(suffix) => {
                        index
                            .suffix
                            .entry(suffix.as_bytes().into())
                            .or_default()
                            .insert(prefix, position);
                        if !index.suffix_lens.contains(&suffix.len()) {
                            index.suffix_lens.push(suffix.len());
                        }
                    }
                }
            }
        }
        index.suffix_lens.sort_unstable_by(|a, b| b.cmp(a));
        index
    }

    /// The position of the service for `host` (no port, any case) and `path`.
    pub fn find(&self, host: &str, path: &str) -> Option<u32> {
        let path = path.as_bytes();
        let host = host.as_bytes();
        let mut stack = [0u8; STACK_HOST];
        let heap;
        let lower: &[u8] = if !host.iter().any(u8::is_ascii_uppercase) {
            host
        } else if let Some(buffer) = stack.get_mut(..host.len()) {
            buffer.copy_from_slice(host);
            buffer.make_ascii_lowercase();
            buffer
        } else {
            heap = host.to_ascii_lowercase();
            &heap
        };
        if let Some(found) = self.exact.get(lower).and_then(|p| p.longest(path)) {
            return Some(found);
        }
        for &len in &self.suffix_lens {
            // A suffix must leave at least one byte of the host in front of it.
            if lower.len() <= len {
                continue;
            }
            let tail = &lower[lower.len() - len..];
            if let Some(found) = self.suffix.get(tail).and_then(|p| p.longest(path)) {
                return Some(found);
            }
        }
        self.any.longest(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The linear scan the index replaced, kept as the specification it must match.
    fn linear(services: &[(Vec<HostMatch>, String)], host: &str, path: &str) -> Option<u32> {
        let mut best: Option<(u32, usize, usize)> = None;
        for (position, (hosts, prefix)) in services.iter().enumerate() {
            if !path.starts_with(prefix.as_str()) {
                continue;
            }
            let Some(specificity) = hosts
                .iter()
                .filter(|h| h.matches(host))
                .map(HostMatch::specificity)
                .max()
            else {
                continue;
            };
            if best.is_none_or(|(_, s, p)| (specificity, prefix.len()) > (s, p)) {
                best = Some((position as u32, specificity, prefix.len()));
            }
        }
        best.map(|(position, _, _)| position)
    }

    fn index(services: &[(Vec<HostMatch>, String)]) -> RouteIndex {
        RouteIndex::new(services.iter().map(|(h, p)| (h.as_slice(), p.as_str())))
    }

    fn host_match() -> impl Strategy<Value = HostMatch> {
        // Few labels, so random hosts often hit random patterns.
        let name = prop::collection::vec(prop::sample::select(vec!["a", "b", "ab", "x-1"]), 1..4)
            .prop_map(|labels| labels.join("."));
        prop_oneof![
            Just(HostMatch::Any),
            name.clone().prop_map(HostMatch::Exact),
            name.prop_map(|n| HostMatch::Suffix(format!(".{n}"))),
        ]
    }

    fn prefix() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "ab", "/"]), 0..4)
            .prop_map(|parts| format!("/{}", parts.concat()))
    }

    fn request_host() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "B", "ab", "x-1", "A"]), 0..5)
            .prop_map(|labels| labels.join("."))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_index_chooses_what_the_linear_scan_chose(
            services in prop::collection::vec(
                (prop::collection::vec(host_match(), 1..3), prefix()), 0..24),
            requests in prop::collection::vec((request_host(), prefix()), 1..16),
        ) {
            let built = index(&services);
            for (host, path) in &requests {
                prop_assert_eq!(built.find(host, path), linear(&services, host, path),
                    "host {:?} path {:?}", host, path);
            }
        }
    }

    #[test]
    fn many_prefixes_of_one_length_are_hashed_and_still_found() {
        let services: Vec<(Vec<HostMatch>, String)> = (0..1000)
            .map(|i| (vec![HostMatch::Exact("h".into())], format!("/p{i:04}/")))
            .chain([(vec![HostMatch::Any], "/".to_string())])
            .collect();
        let built = index(&services);
        assert_eq!(built.find("H", "/p0999/x"), Some(999));
        assert_eq!(
            built.find("h", "/p1000/x"),
            Some(1000),
            "no prefix of host h matches: the catch-all"
        );
        assert_eq!(built.find("other", "/p0999/x"), Some(1000));
    }

    #[test]
    fn an_over_long_host_still_matches_a_suffix_and_any() {
        let services = vec![
            (
                vec![HostMatch::Suffix(".example.com".into())],
                "/".to_string(),
            ),
            (vec![HostMatch::Any], "/".to_string()),
        ];
        let built = index(&services);
        let long = format!("{}.EXAMPLE.com", "a".repeat(400));
        assert_eq!(built.find(&long, "/"), Some(0));
        assert_eq!(
            built.find(".example.com", "/"),
            Some(1),
            "nothing before the dot"
        );
    }
}
