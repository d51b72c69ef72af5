//! URL canonicalization before routing, as HTTP.sys does it: percent-escapes decoded, `\`
//! folded to `/`, empty segments folded, `.` and `..` resolved. NUL, control bytes, bad
//! escapes and paths that climb above `/` are refused.

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("bad percent-escape in the path")]
    BadEscape,
    #[error("the path holds a NUL or control byte")]
    ControlByte,
    #[error("the path climbs above `/`")]
    AboveRoot,
    #[error("the path is not valid UTF-8 once decoded")]
    NotUtf8,
}

/// [`canonicalize`] without a copy for a path that is canonical already (most are).
pub fn canonical_cow(raw: &str) -> Result<std::borrow::Cow<'_, str>, CanonicalError> {
    if raw.starts_with('/') && is_plain(raw.as_bytes()) {
        return Ok(std::borrow::Cow::Borrowed(raw));
    }
    canonicalize(raw.as_bytes()).map(std::borrow::Cow::Owned)
}

/// Canonical form of a raw path (without query) from a request line.
pub fn canonicalize(raw: &[u8]) -> Result<String, CanonicalError> {
    if raw.first() != Some(&b'/') {
        return Err(CanonicalError::NotAbsolute);
    }
    // Most paths are canonical already (the rule the kernel program checks): copy them.
    if is_plain(raw) {
        if let Ok(text) = std::str::from_utf8(raw) {
            return Ok(text.to_owned());
        }
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = match raw[i] {
            b'%' => {
                let hi = raw.get(i + 1).and_then(|c| hex(*c));
                let lo = raw.get(i + 2).and_then(|c| hex(*c));
                match (hi, lo) {
                    (Some(h), Some(l)) => {
                        i += 2;
                        h << 4 | l
                    }
                    _ => return Err(CanonicalError::BadEscape),
                }
            }
            b => b,
        };
        if b < 0x20 || b == 0x7f {
            return Err(CanonicalError::ControlByte);
        }
        decoded.push(if b == b'\\' { b'/' } else { b });
        i += 1;
    }
    let text = String::from_utf8(decoded).map_err(|_| CanonicalError::NotUtf8)?;
    let mut segments: Vec<&str> = Vec::new();
    let trailing = text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..");
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(CanonicalError::AboveRoot);
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(text.len());
    for s in &segments {
        out.push('/');
        // A `%` here was sent as `%25`: keep it escaped so the canonical form is a fixed
        // point, not decoded a second time (or refused) when canonicalized again.
        if s.contains('%') {
            out.push_str(&s.replace('%', "%25"));
        } else {
            out.push_str(s);
        }
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

/// Visible ASCII without `%` or `\\`, and no empty, `.` or `..` segment but a final empty one.
fn is_plain(raw: &[u8]) -> bool {
    if !raw
        .iter()
        .all(|&b| b > b' ' && b < 0x7f && b != b'%' && b != b'\\')
    {
        return false;
    }
    let segments = raw[1..].split(|&b| b == b'/');
    let n = raw[1..].split(|&b| b == b'/').count();
    segments
        .enumerate()
        .all(|(i, s)| !(s == b"." || s == b".." || (s.is_empty() && i + 1 != n)))
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Result<String, CanonicalError> {
        canonicalize(s.as_bytes())
    }

    #[test]
    fn resolves_dots_escapes_and_slashes() {
        assert_eq!(c("/").unwrap(), "/");
        assert_eq!(c("/api/x").unwrap(), "/api/x");
        assert_eq!(c("//api//x/").unwrap(), "/api/x/");
        assert_eq!(c("/api/../web/secret").unwrap(), "/web/secret");
        assert_eq!(c("/api%2Fx").unwrap(), "/api/x");
        assert_eq!(c("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(c("/a\\b").unwrap(), "/a/b");
        assert_eq!(c("/%61pi").unwrap(), "/api");
    }

    #[test]
    fn canonical_form_is_a_fixed_point_for_escaped_percent() {
        // Found by fuzz/fuzz_targets/canonicalize.rs: `%25` decoded to a bare `%`, which a
        // second pass refused (or decoded again).
        let once = canonicalize(b"/%61p%61pi%2F%2e%25y").unwrap();
        assert_eq!(once, "/apapi/.%25y");
        assert_eq!(canonicalize(once.as_bytes()), Ok(once));
        assert_eq!(c("/a%2541").unwrap(), "/a%2541");
    }

    #[test]
    fn plain_paths_take_the_fast_path_unchanged() {
        for p in [
            "/",
            "/api/x",
            "/api/",
            "/a.b/c",
            "/.well-known/x",
            "/a/...",
            "/~u/x-y_z",
        ] {
            assert!(is_plain(p.as_bytes()), "{p}");
            assert_eq!(c(p).unwrap(), p);
        }
        for p in ["//a", "/a//b", "/a/./b", "/a/..", "/a/.", "/a%20b", "/a\\b"] {
            assert!(!is_plain(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_made_canonical() {
        assert_eq!(c("/%2e%2e/"), Err(CanonicalError::AboveRoot));
        assert_eq!(c("/.."), Err(CanonicalError::AboveRoot));
        assert_eq!(c("/a%00"), Err(CanonicalError::ControlByte));
        assert_eq!(c("/a%zz"), Err(CanonicalError::BadEscape));
        assert_eq!(c("/a%4"), Err(CanonicalError::BadEscape));
        assert_eq!(c("api"), Err(CanonicalError::NotAbsolute));
        assert_eq!(c("/%ff"), Err(CanonicalError::NotUtf8));
    }
}
