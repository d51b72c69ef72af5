//! A worker's publication of a cacheable response, from its control channel:
//! `cache <ttl_seconds> <canonical-path>\n` then the response as it went on the wire, without
//! `Date` and `Connection`.

use std::time::Duration;

use super::CacheError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub path: String,
    pub ttl: Duration,
    /// Status line and headers (CRLF-terminated each) without Date, Age, Connection and
    /// Content-Length.
    pub head: Vec<u8>,
    pub body: Vec<u8>,
}

pub fn parse(msg: &[u8]) -> Result<Publication, CacheError> {
    let nl = msg
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(CacheError::Malformed("no first line"))?;
    let first = std::str::from_utf8(&msg[..nl])
        .map_err(|_| CacheError::Malformed("first line is not text"))?;
    // The path is the rest of the line: a canonical path may hold decoded spaces.
    let mut words = first.trim_end_matches('\r').splitn(3, ' ');
    if words.next() != Some("cache") {
        return Err(CacheError::Malformed("not a cache message"));
    }
    let ttl: u64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or(CacheError::Malformed("bad ttl"))?;
    let path = words
        .next()
        .ok_or(CacheError::Malformed("no path"))?
        .to_owned();
    if ttl == 0 || !path.starts_with('/') {
        return Err(CacheError::Malformed("bad first line"));
    }
    if crate::canonical::canonicalize(path.as_bytes())
        .ok()
        .as_deref()
        != Some(path.as_str())
    {
        return Err(CacheError::Malformed("path is not canonical"));
    }
    let response = &msg[nl + 1..];
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(response) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(CacheError::Malformed("the response head does not parse")),
    };
    if parsed.code != Some(200) {
        return Err(CacheError::Malformed("only 200 responses are cached"));
    }
    let mut length = None;
    let mut head = format!("HTTP/1.1 200 {}\r\n", parsed.reason.unwrap_or("OK")).into_bytes();
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "content-length" => {
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
            }
            "date" | "age" | "connection" | "keep-alive" => {}
            "transfer-encoding" | "set-cookie" => {
                return Err(CacheError::Malformed("a header that must not be cached"));
            }
            _ => {
                head.extend_from_slice(h.name.as_bytes());
                head.extend_from_slice(b": ");
                head.extend_from_slice(h.value);
                head.extend_from_slice(b"\r\n");
            }
        }
    }
    let body = &response[head_len..];
    if length != Some(body.len()) {
        return Err(CacheError::Malformed(
            "Content-Length does not match the body",
        ));
    }
    Ok(Publication {
        path,
        ttl: Duration::from_secs(ttl),
        head,
        body: body.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_publication_and_drops_per_answer_headers() {
        let p = parse(
            b"cache 60 /index.html\nHTTP/1.1 200 OK\r\nContent-Type: text/html\r\nCache-Control: public, max-age=60\r\nContent-Length: 5\r\nx-sluice-pool: files\r\n\r\nhello",
        )
        .unwrap();
        assert_eq!(p.path, "/index.html");
        assert_eq!(p.ttl, Duration::from_secs(60));
        assert_eq!(p.body, b"hello");
        let head = String::from_utf8(p.head).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nCache-Control: public, max-age=60\r\nx-sluice-pool: files\r\n"
        );
    }

    #[test]
    fn refuses_bad_publications() {
        for bad in [
            &b"cache 0 /a\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..],
            b"cache 5 /a/../b\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"cache 5 /a\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            b"cache 5 /a\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
            b"cache 5 /a\nHTTP/1.1 200 OK\r\nSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n",
            b"cache x /a\n",
            b"nothing",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
