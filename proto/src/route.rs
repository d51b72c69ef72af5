//! URL-prefix routing, HTTP.sys style: the longest prefix that matches at a segment
//! boundary wins. A prefix is kept normalized to end in `/`; a path matches it when the path
//! with a `/` appended starts with it, so `/api/` takes `/api` and `/api/x` but not `/apix`.
//! The kernel program uses the same rule with its LPM-trie key.

/// Whether `name` can be a pool's name: letters, digits, `-` and `_`, not empty.
pub fn valid_pool_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks and normalizes a configured prefix.
pub fn normalize_prefix(prefix: &str) -> Result<String, &'static str> {
    if !prefix.starts_with('/') {
        return Err("must start with `/`");
    }
    if prefix
        .bytes()
        .any(|b| b <= b' ' || b >= 0x7f || b == b'%' || b == b'\\' || b == b'?')
    {
        return Err("must be a plain path: visible ASCII without `%`, `\\` or `?`");
    }
    let canonical =
        crate::canonical::canonicalize(prefix.as_bytes()).map_err(|_| "is not a canonical path")?;
    let mut p = prefix.to_owned();
    if !p.ends_with('/') {
        p.push('/');
    }
    let mut c = canonical;
    if !c.ends_with('/') {
        c.push('/');
    }
    if c != p {
        return Err("is not canonical (it holds `//`, `.` or `..` segments)");
    }
    Ok(p)
}

/// The routing table in user space: same content as the kernel's prefix map. `T` is what a
/// route leads to (the front end's pool id, a worker's index into its list of pool names).
#[derive(Debug, Clone)]
pub struct RouteTable<T = usize> {
    /// (normalized prefix, pool), longest first.
    entries: Vec<(String, T)>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            entries: Vec::new(),
        }
    }
}

impl<T: Copy> RouteTable<T> {
    pub fn new(routes: impl IntoIterator<Item = (String, T)>) -> RouteTable<T> {
        let mut entries: Vec<_> = routes.into_iter().collect();
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        RouteTable { entries }
    }

    /// The pool for a canonical path (`/`-rooted, no query).
    pub fn lookup(&self, path: &str) -> Option<T> {
        self.entries
            .iter()
            .find(|(prefix, _)| matches(prefix, path))
            .map(|(_, pool)| *pool)
    }
}

fn matches(prefix: &str, path: &str) -> bool {
    // path + "/" starts with prefix (prefix ends in '/')
    let p = prefix.as_bytes();
    let q = path.as_bytes();
    if q.len() >= p.len() {
        q.starts_with(p)
    } else {
        q.len() + 1 == p.len() && p.starts_with(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new([("/api/".into(), 1), ("/".into(), 0), ("/api/v2/".into(), 2)])
    }

    #[test]
    fn prefix_matches_at_segment_boundaries_only() {
        let t = table();
        assert_eq!(t.lookup("/api"), Some(1));
        assert_eq!(t.lookup("/api/"), Some(1));
        assert_eq!(t.lookup("/api/x"), Some(1));
        assert_eq!(t.lookup("/apix"), Some(0));
        assert_eq!(t.lookup("/api/v2"), Some(2));
        assert_eq!(t.lookup("/api/v2x"), Some(1));
        assert_eq!(t.lookup("/"), Some(0));
    }

    #[test]
    fn no_route_without_a_root_prefix() {
        let t = RouteTable::new([("/api/".into(), 1)]);
        assert_eq!(t.lookup("/"), None);
        assert_eq!(t.lookup("/ap"), None);
    }

    #[test]
    fn prefixes_are_normalized_or_refused() {
        assert_eq!(normalize_prefix("/api").unwrap(), "/api/");
        assert_eq!(normalize_prefix("/").unwrap(), "/");
        assert!(normalize_prefix("api").is_err());
        assert!(normalize_prefix("/a//b").is_err());
        assert!(normalize_prefix("/a/../b").is_err());
        assert!(normalize_prefix("/a%20b").is_err());
    }
}
