//! The request head as the backend gets it, and the response head as it comes back:
//! strict where hyper is (no bare LF, no obsolete line folding, no response carrying both
//! `Content-Length` and `Transfer-Encoding`, at most `MAX_HEADERS` fields in at most
//! `MAX_HEAD` bytes), and the body framing RFC 9112 §6.3 gives the response.

use std::io::Write as _;
use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, COOKIE, TRANSFER_ENCODING,
};
use http::{HeaderMap, Method, StatusCode, Version};

use super::Error;
use crate::headers::{Forwarded, ListsSeen};

/// Most header fields a response head (or a trailer section) may carry; hyper's limit.
pub const MAX_HEADERS: usize = 100;
/// Longest response head accepted, status line to the empty line.
pub const MAX_HEAD: usize = 64 * 1024;

/// How the request's body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body follows the head.
    Empty,
    /// `Content-Length` bytes; `add_header`: the proxy writes the header itself.
    Length { length: u64, add_header: bool },
    /// Chunked, with the header written by the proxy.
    Chunked,
}

impl RequestFraming {
    /// The client's `Content-Length` when it gave one (hyper checked it), else what the
    /// body knows of its size, else chunked. Transfer-Encoding is hop-by-hop: the
    /// client's is already gone.
    pub fn of(headers: &HeaderMap, body_ended: bool, exact_size: Option<u64>) -> Self {
        if body_ended {
            return RequestFraming::Empty;
        }
        let given = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        match (given, exact_size) {
            (Some(length), _) => RequestFraming::Length {
                length,
                add_header: false,
            },
            (None, Some(length)) => RequestFraming::Length {
                length,
                add_header: true,
            },
            (None, None) => RequestFraming::Chunked,
        }
    }
}

/// Writes the request head into `out` (cleared first), with `forwarded`'s fields after
/// the client's when the proxy's own request path gives them. Names and values come
/// from `http` types, which cannot hold CR or LF, so nothing here can split the head.
pub fn encode_request(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    forwarded: Option<&Forwarded>,
    framing: RequestFraming,
) {
    out.clear();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut seen = ListsSeen::default();
    let mut cookies_written = false;
    for (name, value) in &parts.headers {
        if forwarded.is_some_and(|f| f.replaces(name, &mut seen)) {
            continue;
        }
        if name == COOKIE {
            if !cookies_written {
                cookies_written = true;
                encode_cookies(out, &parts.headers);
            }
            continue;
        }
        encode_field(out, name, value);
    }
    if let Some(forwarded) = forwarded {
        forwarded.write_h1_fields(&parts.headers, seen, out);
    }
    match framing {
        RequestFraming::Length {
            length,
            add_header: true,
        } => {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "content-length: {length}\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// An HTTP/2 client may split its cookies into one field per cookie (RFC 9113
/// §8.2.3), and HTTP/1.1 allows one `Cookie` line: a backend that reads the first only
/// would lose the rest. The pieces go out joined with `"; "`, in one line.
fn encode_cookies(out: &mut Vec<u8>, headers: &HeaderMap) {
    out.extend_from_slice(b"cookie: ");
    for (i, value) in headers.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `headers` as field lines (a head's, or a chunked body's trailer section).
pub fn encode_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        encode_field(out, name, value);
    }
}

fn encode_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// How the response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// Read until the backend closes; the connection cannot be reused.
    UntilClose,
    /// 101: the connection now carries the upgraded protocol.
    Upgrade,
}

#[derive(Debug)]
pub struct Head {
    pub parts: http::response::Parts,
    pub body: BodyKind,
    /// The backend lets the connection carry another request after this one.
    pub keep_alive: bool,
}

fn parser() -> httparse::ParserConfig {
    // The defaults refuse obsolete line folding and spaces before a field's colon.
    httparse::ParserConfig::default()
}

/// Where one header field lies in the head's bytes. A head is at most `MAX_HEAD`
/// bytes, so every offset fits in 16 bits: the array of them that each parse zeroes is
/// 800 bytes rather than 3,200.
#[derive(Clone, Copy, Default)]
struct FieldAt {
    name: (u16, u16),
    value: (u16, u16),
}

fn offsets(base: &[u8], part: &[u8]) -> Result<(u16, u16), Error> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    let at = |offset: usize| u16::try_from(offset).map_err(|_| Error::HeadTooLarge);
    Ok((at(start)?, at(start + part.len())?))
}

fn range((start, end): (u16, u16)) -> std::ops::Range<usize> {
    usize::from(start)..usize::from(end)
}

/// Which of the fields that decide the framing a head has: the lookups for those it
/// lacks (most heads lack two of the three) are skipped.
#[derive(Clone, Copy, Default)]
struct Framing {
    content_length: ContentLength,
    transfer_encoding: bool,
    connection: bool,
}

/// The `Content-Length` fields, read as the head is parsed: whether they are an error
/// depends on the rest of the head (a 204 or a HEAD answer ignores them), so an invalid
/// one is kept as such, not refused yet.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
enum ContentLength {
    #[default]
    Absent,
    Valid(u64),
    Invalid,
}

impl ContentLength {
    /// With one more field: a comma-separated list of the same length, as RFC 9112
    /// §6.3 allows; anything else makes the whole invalid.
    fn and(self, value: &[u8]) -> ContentLength {
        let mut length = self;
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            // 19 digits always fit in a u64.
            let parsed = (!item.is_empty() && item.len() <= 19)
                .then(|| {
                    item.iter().try_fold(0u64, |n, &b| {
                        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
                    })
                })
                .flatten();
            length = match (length, parsed) {
                (ContentLength::Invalid, _) | (_, None) => return ContentLength::Invalid,
                (ContentLength::Valid(seen), Some(parsed)) if seen != parsed => {
                    return ContentLength::Invalid
                }
                (_, Some(parsed)) => ContentLength::Valid(parsed),
            };
        }
        length
    }
}

/// A bare LF ends lines for httparse; hyper refuses it, and so does this.
pub fn has_bare_lf(head: &[u8]) -> bool {
    // A head has a few LFs among hundreds of bytes: found with SIMD, not byte by byte
    // (which was half of parsing a response head).
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

/// The response head at the start of `buf`, taken out of it; `Ok(None)` while it is
/// incomplete. Informational responses (100, 103) are dropped as they come: the client
/// gets the final one.
pub fn parse_response(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, Error> {
    parse_response_into(buf, method, &mut None, &mut FieldNames::default())
}

/// `parse_response`, the fields going into `spare` (an empty map, taken only for the
/// final head) when there is one, their names looked up in `names` first.
pub fn parse_response_into(
    buf: &mut BytesMut,
    method: &Method,
    spare: &mut Option<HeaderMap>,
    names: &mut FieldNames,
) -> Result<Option<Head>, Error> {
    loop {
        let mut field_at = [FieldAt::default(); MAX_HEADERS];
        let (len, code, version, count) = {
            let mut uninit = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let len = match parser().parse_response_with_uninit_headers(
                &mut response,
                buf,
                &mut uninit,
            ) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err(Error::HeadTooLarge)
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
                Err(e) => return Err(Error::Malformed(e)),
            };
            if len > MAX_HEAD {
                return Err(Error::HeadTooLarge);
            }
            if has_bare_lf(&buf[..len]) {
                return Err(Error::BareLf);
            }
            for (at, header) in field_at.iter_mut().zip(response.headers.iter()) {
                at.name = offsets(buf, header.name.as_bytes())?;
                at.value = offsets(buf, header.value)?;
            }
            (
                len,
                response.code.unwrap_or_default(),
                response.version.unwrap_or_default(),
                response.headers.len(),
            )
        };
        let head = buf.split_to(len).freeze();
        let status = StatusCode::from_u16(code).map_err(|_| Error::BadStatus)?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        let (headers, framing) = header_map(&head, &field_at[..count], spare.take(), names)?;
        let version = if version == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let body = body_kind(status, version, method, &headers, framing)?;
        let keep_alive = body != BodyKind::UntilClose
            && body != BodyKind::Upgrade
            && keeps_alive(version, &headers, framing);
        let mut response = http::Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        let (parts, ()) = response.into_parts();
        return Ok(Some(Head {
            parts,
            body,
            keep_alive,
        }));
    }
}

/// The fields, their values sharing `head`'s bytes instead of a copy each.
fn header_map(
    head: &Bytes,
    fields: &[FieldAt],
    spare: Option<HeaderMap>,
    names: &mut FieldNames,
) -> Result<(HeaderMap, Framing), Error> {
    let mut headers = match spare {
        Some(mut map) => {
            // Given empty; cleared again only if not, as clearing walks its whole table.
            if !map.is_empty() {
                map.clear();
            }
            map.reserve(fields.len());
            map
        }
        None => HeaderMap::with_capacity(fields.len()),
    };
    let mut framing = Framing::default();
    for (position, at) in fields.iter().enumerate() {
        let name = names.name(position, &head[range(at.name)])?;
        let value = HeaderValue::from_maybe_shared(head.slice(range(at.value)))
            .map_err(|_| Error::BadHeader)?;
        if name == CONTENT_LENGTH {
            framing.content_length = framing.content_length.and(value.as_bytes());
        }
        framing.transfer_encoding |= name == TRANSFER_ENCODING;
        framing.connection |= name == CONNECTION;
        headers.append(name, value);
    }
    Ok((headers, framing))
}

/// The field names of a backend connection's last response, as they came and as made:
/// a backend sends the same names in the same order answer after answer, and a name
/// whose bytes are the same as those kept at its place is cloned instead of looked up
/// among the standard names again (and, for one the `http` crate does not know,
/// allocated again).
#[derive(Default)]
pub struct FieldNames {
    seen: Vec<(RawName, HeaderName)>,
}

/// Names kept per connection: the first few of a response, which are most of most.
const FIELD_NAMES_KEPT: usize = 8;

/// Longest name kept, as it came. Kept inline, so that keeping a new name (a backend
/// whose fields come in another order) allocates nothing, and compared exactly, which
/// is cheaper than a comparison that ignores case.
const RAW_NAME_MAX: usize = 24;

#[derive(Clone, Copy)]
struct RawName {
    len: u8,
    bytes: [u8; RAW_NAME_MAX],
}

impl RawName {
    fn new(raw: &[u8]) -> Option<RawName> {
        let mut bytes = [0; RAW_NAME_MAX];
        bytes.get_mut(..raw.len())?.copy_from_slice(raw);
        Some(RawName {
            len: raw.len() as u8,
            bytes,
        })
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl FieldNames {
    /// The name of the field at `position`, whose bytes are `raw` (a token: httparse
    /// checked it, and `HeaderName` checks it again when it is not the one kept).
    fn name(&mut self, position: usize, raw: &[u8]) -> Result<HeaderName, Error> {
        if let Some((kept, name)) = self.seen.get(position) {
            if kept.as_slice() == raw {
                return Ok(name.clone());
            }
        }
        let name = HeaderName::from_bytes(raw).map_err(|_| Error::BadHeader)?;
        if let Some(raw) = RawName::new(raw) {
            let len = self.seen.len();
            match self.seen.get_mut(position) {
                Some(slot) => *slot = (raw, name.clone()),
                None if position == len && len < FIELD_NAMES_KEPT => {
                    self.seen.push((raw, name.clone()))
                }
                None => {}
            }
        }
        Ok(name)
    }
}

/// RFC 9112 §6.3, where a response with both lengths is refused rather than guessed at
/// (the case request smuggling through a proxy is made of).
fn body_kind(
    status: StatusCode,
    version: Version,
    method: &Method,
    headers: &HeaderMap,
    framing: Framing,
) -> Result<BodyKind, Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(BodyKind::Upgrade);
    }
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(BodyKind::Empty);
    }
    let has_length = framing.content_length != ContentLength::Absent;
    let last_coding = framing
        .transfer_encoding
        .then(|| headers.get_all(TRANSFER_ENCODING).iter().next_back())
        .flatten();
    if let Some(last) = last_coding {
        if has_length {
            return Err(Error::BothLengths);
        }
        if version == Version::HTTP_10 {
            return Err(Error::TransferEncodingInHttp10);
        }
        let chunked_last = last
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked_last {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        });
    }
    if !has_length {
        return Ok(BodyKind::UntilClose);
    }
    match framing.content_length {
        ContentLength::Valid(0) => Ok(BodyKind::Empty),
        ContentLength::Valid(length) => Ok(BodyKind::Length(length)),
        ContentLength::Absent | ContentLength::Invalid => Err(Error::BadContentLength),
    }
}

fn keeps_alive(version: Version, headers: &HeaderMap, framing: Framing) -> bool {
    if !framing.connection {
        return version == Version::HTTP_11;
    }
    let mut close = false;
    let mut keep_alive = false;
    for value in headers.get_all(CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    !close && (version == Version::HTTP_11 || keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Head>, Error> {
        parse_response(&mut BytesMut::from(text), &Method::GET)
    }

    #[test]
    fn a_bare_lf_is_found_anywhere_and_a_crlf_is_not_one() {
        assert!(!has_bare_lf(b""));
        assert!(!has_bare_lf(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"));
        assert!(has_bare_lf(b"\n"));
        assert!(has_bare_lf(b"HTTP/1.1 200 OK\r\nA: b\n\r\n"));
        assert!(has_bare_lf(b"HTTP/1.1 200 OK\r\n\r\n\n"));
        assert!(has_bare_lf(b"\r\n\r\r\n\n"));
    }

    /// The head's field lines, grouped by name (stable: lines of one name keep their
    /// order), without the request line.
    fn lines_by_name(head: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(head).unwrap();
        let mut lines: Vec<String> = text
            .split("\r\n")
            .skip(1)
            .filter(|line| !line.is_empty())
            .map(str::to_string)
            .collect();
        lines.sort_by_key(|line| line.split(':').next().unwrap_or("").to_string());
        lines
    }

    #[test]
    fn the_forwarded_fields_the_encoder_writes_are_those_apply_puts_in_the_map() {
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[("host", "app.example"), ("accept", "*/*")],
            &[
                ("x-forwarded-for", "10.0.0.1"),
                ("accept", "*/*"),
                ("x-forwarded-for", "10.0.0.2"),
                ("via", "1.1 edge"),
            ],
            &[
                ("x-forwarded-for", ""),
                ("x-forwarded-for", "b"),
                ("x-forwarded-proto", "ftp"),
                ("x-forwarded-host", "spoofed.example"),
            ],
            &[
                ("via", ""),
                ("x-other", "1"),
                ("x-other", "2"),
                ("via", "2 cdn"),
            ],
        ];
        let client = HeaderValue::from_static("192.0.2.7");
        let mut compared = 0;
        for fields in cases {
            for tls in [false, true] {
                for host in [None, Some("app.example:8080")] {
                    for version in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
                        let forwarded = Forwarded::new(
                            &client,
                            tls,
                            host.map(HeaderValue::from_static),
                            version,
                        );
                        let mut written = Vec::new();
                        let parts = request(Method::GET, "/x", fields);
                        encode_request(
                            &mut written,
                            &parts,
                            Some(&forwarded),
                            RequestFraming::Empty,
                        );
                        let mut applied = request(Method::GET, "/x", fields);
                        forwarded.apply(&mut applied.headers);
                        let mut from_map = Vec::new();
                        encode_request(&mut from_map, &applied, None, RequestFraming::Empty);
                        assert_eq!(
                            lines_by_name(&written),
                            lines_by_name(&from_map),
                            "{fields:?} tls {tls} host {host:?} {version:?}"
                        );
                        assert!(written.starts_with(b"GET /x HTTP/1.1\r\n"));
                        assert!(written.ends_with(b"\r\n\r\n"));
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 60);
    }

    #[test]
    fn field_names_kept_from_one_answer_serve_the_next_only_where_the_bytes_match() {
        fn parse(names: &mut FieldNames, text: &str) -> HeaderMap {
            let mut spare = None;
            parse_response_into(&mut BytesMut::from(text), &Method::GET, &mut spare, names)
                .unwrap()
                .unwrap()
                .parts
                .headers
        }
        let mut names = FieldNames::default();
        let first = parse(
            &mut names,
            "HTTP/1.1 200 OK\r\nX-Upstream: a\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(first["x-upstream"], "a");
        // A different name at a kept place, and one in other letter case.
        let second = parse(
            &mut names,
            "HTTP/1.1 200 OK\r\nX-Other: b\r\ncontent-LENGTH: 0\r\n\r\n",
        );
        assert!(second.get("x-upstream").is_none());
        assert_eq!(second["x-other"], "b");
        assert_eq!(second["content-length"], "0");
        let third = parse(
            &mut names,
            "HTTP/1.1 200 OK\r\nX-Other: c\r\ncontent-length: 0\r\nVia: 1.1 x\r\n\r\n",
        );
        assert_eq!(third["x-other"], "c");
        assert_eq!(third["via"], "1.1 x");
        assert_eq!(third.len(), 3);
        let kept: Vec<(&[u8], &str)> = names
            .seen
            .iter()
            .map(|(raw, name)| (raw.as_slice(), name.as_str()))
            .collect();
        assert_eq!(
            kept,
            [
                (&b"X-Other"[..], "x-other"),
                (b"content-length", "content-length"),
                (b"Via", "via")
            ]
        );
        // A name too long to keep, at a kept place: made each time, and right.
        let long_name = "X-A-Name-Longer-Than-Kept-Ones";
        for value in ["1", "2"] {
            let answer = parse(
                &mut names,
                &format!("HTTP/1.1 200 OK\r\n{long_name}: {value}\r\n\r\n"),
            );
            assert_eq!(answer["x-a-name-longer-than-kept-ones"], value);
            assert!(answer.get("x-other").is_none());
        }
        // Past the kept places, and a shorter answer after a longer one.
        let many: String = (0..12).map(|i| format!("X-F{i}: {i}\r\n")).collect();
        let long = parse(
            &mut names,
            &format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 0\r\n\r\n"),
        );
        assert_eq!(long.len(), 13);
        assert_eq!(long["x-f11"], "11");
        assert_eq!(names.seen.len(), FIELD_NAMES_KEPT);
        let short = parse(&mut names, "HTTP/1.1 200 OK\r\nX-F0: a\r\n\r\n");
        assert_eq!(short.len(), 1);
        assert_eq!(short["x-f0"], "a");
        // A name at a kept place whose bytes differ only by a byte no name may hold.
        let mut bad = BytesMut::from("HTTP/1.1 200 OK\r\nX-F0\x01: a\r\n\r\n");
        assert!(parse_response_into(&mut bad, &Method::GET, &mut None, &mut names).is_err());
    }

    #[test]
    fn content_length_fields_fold_into_one_length_or_invalid() {
        let fold = |fields: &[&str]| {
            fields.iter().fold(ContentLength::Absent, |length, field| {
                length.and(field.as_bytes())
            })
        };
        assert_eq!(fold(&[]), ContentLength::Absent);
        assert_eq!(fold(&["0018"]), ContentLength::Valid(18));
        assert_eq!(fold(&[" 7 ", "7, 7"]), ContentLength::Valid(7));
        assert_eq!(
            fold(&["9999999999999999999"]),
            ContentLength::Valid(9_999_999_999_999_999_999)
        );
        for bad in [
            &[""][..],
            &["1,"],
            &[" "],
            &["12345678901234567890"],
            &["7", "8"],
            &["7", ""],
            &["1 2"],
            &["+1"],
        ] {
            assert_eq!(fold(bad), ContentLength::Invalid, "{bad:?}");
        }
    }

    fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_request_head_is_origin_form_http11_with_the_framing_the_body_needs() {
        let mut out = Vec::new();
        let parts = request(Method::POST, "/a?b=c", &[("host", "app"), ("x-one", "1")]);
        encode_request(&mut out, &parts, None, RequestFraming::Chunked);
        assert_eq!(
            out,
            b"POST /a?b=c HTTP/1.1\r\nhost: app\r\nx-one: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        encode_request(
            &mut out,
            &request(Method::PUT, "/", &[]),
            None,
            RequestFraming::Length {
                length: 12,
                add_header: true,
            },
        );
        assert_eq!(out, b"PUT / HTTP/1.1\r\ncontent-length: 12\r\n\r\n");
    }

    #[test]
    fn request_framing_follows_the_clients_length_then_the_bodys() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            RequestFraming::of(&headers, true, Some(0)),
            RequestFraming::Empty
        );
        assert_eq!(
            RequestFraming::of(&headers, false, None),
            RequestFraming::Chunked
        );
        assert_eq!(
            RequestFraming::of(&headers, false, Some(3)),
            RequestFraming::Length {
                length: 3,
                add_header: true
            }
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("7"));
        assert_eq!(
            RequestFraming::of(&headers, false, Some(7)),
            RequestFraming::Length {
                length: 7,
                add_header: false
            }
        );
    }

    #[test]
    fn a_complete_head_is_taken_out_of_the_buffer_and_the_body_stays() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi");
        let head = parse_response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.parts.status, StatusCode::OK);
        assert_eq!(head.parts.headers["x-a"], "b");
        assert_eq!(head.body, BodyKind::Length(2));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"hi");
    }

    #[test]
    fn an_incomplete_head_asks_for_more_until_it_is_too_large() {
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        let long = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(parse(&long), Err(Error::HeadTooLarge)));
    }

    #[test]
    fn a_head_of_the_largest_size_keeps_its_fields_and_their_framing() {
        // The offsets of its last field are near the top of their 16 bits.
        let lead = "HTTP/1.1 200 OK\r\nX-Long: ";
        let tail = "\r\nConnection: close\r\nContent-Length: 2\r\n\r\n";
        let filler = "a".repeat(MAX_HEAD - lead.len() - tail.len());
        let text = format!("{lead}{filler}{tail}hi");
        let mut buf = BytesMut::from(text.as_str());
        let head = parse_response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.parts.headers["x-long"].len(), filler.len());
        assert_eq!(head.parts.headers["content-length"], "2");
        assert_eq!(head.body, BodyKind::Length(2));
        assert!(!head.keep_alive, "its Connection: close was read");
        assert_eq!(&buf[..], b"hi");
        let over = format!("{lead}a{filler}{tail}");
        assert!(matches!(parse(&over), Err(Error::HeadTooLarge)));
    }

    #[test]
    fn refused_heads() {
        let cases = [
            ("HTTP/1.1 200 OK\nContent-Length: 0\n\n", "bare LF"),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0\nX: y\r\n\r\n",
                "bare LF in a field",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both lengths",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
                "two lengths",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                "two fields",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "negative length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
                "hex length",
            ),
            (
                "HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
                "obsolete folding",
            ),
            ("HTTP/1.1 200 OK\r\nX : a\r\n\r\n", "space before colon"),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "TE in HTTP/1.0",
            ),
            ("HTTP/2.0 200 OK\r\n\r\n", "not HTTP/1.x"),
            ("HTTP/1.1 20 OK\r\n\r\n", "two-digit status"),
        ];
        for (text, what) in cases {
            assert!(parse(text).is_err(), "{what} was accepted: {text:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(matches!(
            parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
            Err(Error::TooManyHeaders)
        ));
    }

    #[test]
    fn body_framing_per_rfc_9112() {
        let kind = |text: &str| parse(text).unwrap().unwrap().body;
        assert_eq!(kind("HTTP/1.1 204 No Content\r\n\r\n"), BodyKind::Empty);
        assert_eq!(
            kind("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            BodyKind::Empty
        );
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            BodyKind::Length(5)
        );
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"),
            BodyKind::Chunked
        );
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            BodyKind::UntilClose
        );
        assert_eq!(kind("HTTP/1.1 200 OK\r\n\r\n"), BodyKind::UntilClose);
        assert_eq!(
            kind("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
            BodyKind::Upgrade
        );
        let head = parse_response(
            &mut BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            &Method::HEAD,
        );
        assert_eq!(head.unwrap().unwrap().body, BodyKind::Empty);
    }

    #[test]
    fn informational_responses_are_skipped() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        );
        let head = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
        assert_eq!(head.parts.status, StatusCode::CREATED);
        assert!(buf.is_empty());
    }

    #[test]
    fn keep_alive_by_version_and_connection_tokens() {
        let alive = |text: &str| parse(text).unwrap().unwrap().keep_alive;
        assert!(alive("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!alive(
            "HTTP/1.1 200 OK\r\nConnection: foo, Close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!alive("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(alive(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!alive("HTTP/1.1 200 OK\r\n\r\n"));
    }
}
