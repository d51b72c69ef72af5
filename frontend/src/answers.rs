//! Every answer the front end writes itself, in HTTP/1 text: refusals, redirects, the
//! heads of static cache entries and the metrics page. One writer, which knows the
//! request's method: an answer to `HEAD` is its head alone, so a client reading it as a HEAD
//! answer does not take the text for the next response.

/// A complete answer that closes the connection: `code`, its reason phrase, and `why` as a
/// one-line text body (left out when `head_only`).
pub fn refusal(code: u16, why: &str, head_only: bool) -> Vec<u8> {
    let reason = reason(code);
    let body = format!("{code} {reason}: {why}\n");
    let retry = if code == 503 {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let shown = if head_only { "" } else { body.as_str() };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{retry}Connection: close\r\nServer: sluice\r\n\r\n{shown}",
        body.len()
    )
    .into_bytes()
}

/// `308` to `location` (`pipeline::redirect::location`), closing the connection (a body
/// the request may have is not read).
pub fn redirect(location: &str, head_only: bool) -> Vec<u8> {
    let body = format!("308 Permanent Redirect: {location}\n");
    let shown = if head_only { "" } else { body.as_str() };
    format!(
        "HTTP/1.1 308 Permanent Redirect\r\nLocation: {location}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nServer: sluice\r\n\r\n{shown}",
        body.len()
    )
    .into_bytes()
}

/// The head lines of a static cache entry (`[[cache.static]]`), before the cache adds
/// `Content-Length`, `Date` and the connection's own lines.
pub fn static_head(content_type: &str, max_age_secs: u64) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: public, max-age={max_age_secs}\r\nServer: sluice\r\n"
    )
    .into_bytes()
}

/// The metrics endpoint's answer: `status` ("200 OK") and Prometheus text.
pub fn metrics(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn reason(code: u16) -> &'static str {
    match code {
        400 => "Bad Request",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_to_head_is_its_head_alone_with_the_length_a_get_would_have() {
        let get = String::from_utf8(refusal(400, "bad", false)).unwrap();
        let head = String::from_utf8(refusal(400, "bad", true)).unwrap();
        assert!(get.starts_with(&head) && get.len() > head.len());
        assert!(head.ends_with("\r\n\r\n"));
        let body = &get[head.len()..];
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        let get = String::from_utf8(redirect("https://a/", false)).unwrap();
        let head = String::from_utf8(redirect("https://a/", true)).unwrap();
        assert!(head.ends_with("\r\n\r\n") && get.starts_with(&head));
        assert!(get.len() > head.len());
    }

    #[test]
    fn a_503_asks_the_client_to_retry() {
        let text = String::from_utf8(refusal(503, "full", false)).unwrap();
        assert!(text.contains("Retry-After: 1\r\n"));
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    }
}
