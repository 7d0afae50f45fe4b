//! The chunked transfer coding of a response body (RFC 9112 §7.1), decoded from the
//! connection's read buffer in place: data chunks are handed on as slices of it.
//! Refused: a size that is not 1 to 15 hex digits, a CR inside an extension, a line
//! over `MAX_LINE`, a bare LF, data not followed by CRLF, a trailer section over
//! `head::MAX_HEAD`.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use super::head::{has_bare_lf, MAX_HEAD, MAX_HEADERS};
use super::Error;

/// Longest chunk-size line, extensions included.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

#[derive(Debug)]
pub enum Step {
    Data(Bytes),
    /// The last chunk came; `Some`: with these trailer fields.
    End(Option<HeaderMap>),
}

impl Chunked {
    /// The next step `buf` allows; `Ok(None)` when more must be read first.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Step>, Error> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(line) = line_end(buf, MAX_LINE)? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..line])?;
                    buf.advance(line + 2);
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = left.min(buf.len() as u64);
                    *self = match left - take {
                        0 => Chunked::DataEnd,
                        left => Chunked::Data(left),
                    };
                    return Ok(Some(Step::Data(buf.split_to(take as usize).freeze())));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::BadChunk("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => return trailers(buf),
            }
        }
    }
}

/// Where the line at the start of `buf` ends (its CR), refusing a bare LF.
fn line_end(buf: &[u8], max: usize) -> Result<Option<usize>, Error> {
    let window = &buf[..buf.len().min(max)];
    match window.iter().position(|&b| b == b'\n') {
        Some(0) => Err(Error::BareLf),
        Some(lf) if window[lf - 1] != b'\r' => Err(Error::BareLf),
        Some(lf) => Ok(Some(lf - 1)),
        None if buf.len() >= max => Err(Error::BadChunk("chunk size line too long")),
        None => Ok(None),
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(Error::BadChunk("chunk size is not 1 to 15 hex digits"));
    }
    // Only spaces and tabs may come before an extension (BWS, RFC 9112 §7.1.1).
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
        return Err(Error::BadChunk("bad chunk extension"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| Error::BadChunk("chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| Error::BadChunk("chunk size"))
}

fn trailers(buf: &mut BytesMut) -> Result<Option<Step>, Error> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Some(Step::End(None)));
    }
    let window = &buf[..buf.len().min(MAX_HEAD)];
    let end = window.windows(4).position(|w| w == b"\r\n\r\n");
    if has_bare_lf(end.map_or(window, |end| &window[..end + 4])) {
        return Err(Error::BareLf);
    }
    let Some(end) = end else {
        if buf.len() >= MAX_HEAD {
            return Err(Error::HeadTooLarge);
        }
        return Ok(None);
    };
    let section = &buf[..end + 4];
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed = match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        Ok(httparse::Status::Partial) => return Err(Error::BadChunk("trailer section")),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
        Err(e) => return Err(Error::Malformed(e)),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Error::BadHeader)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| Error::BadHeader)?;
        map.append(name, value);
    }
    buf.advance(end + 4);
    Ok(Some(Step::End(Some(map))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes all of `text`, fed in pieces of `piece` bytes.
    fn decode(text: &[u8], piece: usize) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match state.decode(&mut buf)? {
                Some(Step::Data(bytes)) => data.extend_from_slice(&bytes),
                Some(Step::End(trailers)) => return Ok((data, trailers)),
                None if fed < text.len() => {
                    let next = (fed + piece).min(text.len());
                    buf.extend_from_slice(&text[fed..next]);
                    fed = next;
                }
                None => return Err(Error::Truncated),
            }
        }
    }

    #[test]
    fn chunks_decode_whole_or_byte_by_byte_with_extensions_and_trailers() {
        let body =
            b"5\r\nhello\r\n6;name=value\r\n world\r\nA \r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n";
        for piece in [1, 3, body.len()] {
            let (data, trailers) = decode(body, piece).unwrap();
            assert_eq!(data, b"hello world0123456789");
            assert_eq!(trailers.unwrap()["x-sum"], "1");
        }
        assert_eq!(decode(b"0\r\n\r\n", 1).unwrap(), (Vec::new(), None));
    }

    #[test]
    fn bad_chunking_is_refused() {
        let cases: [&[u8]; 12] = [
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
            b"5\r;x\r\nhello\r\n0\r\n\r\n",
        ];
        for case in cases {
            assert!(
                decode(case, 1).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(case)
            );
            assert!(decode(case, case.len()).is_err());
        }
        let long = [b"1;".as_slice(), &[b'a'; MAX_LINE], b"\r\n"].concat();
        assert!(decode(&long, 64).is_err());
    }

    #[test]
    fn a_body_cut_short_is_not_taken_for_the_end() {
        assert!(matches!(decode(b"5\r\nhel", 2), Err(Error::Truncated)));
        assert!(matches!(
            decode(b"5\r\nhello\r\n", 2),
            Err(Error::Truncated)
        ));
    }
}
