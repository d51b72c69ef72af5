//! Any bytes through the URL canonicalizer: what it accepts must really be canonical, since
//! routing (and the kernel's prefix match) trusts that form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::canonical::canonicalize;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = canonicalize(data) else { return };
    assert!(s.starts_with('/'), "{s:?} is not rooted");
    assert!(!s.contains("//"), "{s:?} has an empty segment");
    assert!(
        !s.contains("/./") && !s.contains("/../"),
        "{s:?} has a dot segment"
    );
    assert!(
        !s.ends_with("/.") && !s.ends_with("/.."),
        "{s:?} ends in a dot segment"
    );
    assert!(
        !s.bytes().any(|b| b < 0x20 || b == 0x7f),
        "{s:?} holds a control byte"
    );
    // The canonical form of a canonical path is itself, or two hops could route differently.
    assert_eq!(
        canonicalize(s.as_bytes()),
        Ok(s.clone()),
        "not idempotent for {data:?}"
    );
});
