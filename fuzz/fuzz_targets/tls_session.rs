//! Any bytes as a TLS connection's handoff payload (what a worker hands back): the session
//! decodes or is refused, never panics; a decoded one encodes to bytes that decode to it; and
//! its record layer opens whatever records follow (garbage, truncated, oversized) without
//! panicking, then seals. The same bytes as the start of a connection on a TLS listener
//! (a ClientHello the front end reads for its SNI name): a name by the kernel's rule, or
//! none, never a panic. Nothing a worker or a client sends may take the front end down.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_tls::{RecordLayer, Session};

fuzz_target!(|data: &[u8]| {
    if let sluice_tls::hello::Hello::Done(Some(name)) = sluice_tls::hello::read(data) {
        assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
        assert!(name.bytes().all(|b| b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || b"-_.".contains(&b)));
    }
    let Ok((session, rest)) = Session::decode(data) else {
        return;
    };
    let mut again = Vec::new();
    session.encode(&mut again);
    assert_eq!(Session::decode(&again).map(|(s, _)| s), Ok(session.clone()));
    let Ok(mut layer) = RecordLayer::new(&session) else {
        return;
    };
    let mut input = rest.to_vec();
    let mut at = 0;
    while let Ok(Some((n, _))) = layer.open(&mut input[at..]) {
        assert!(n > 0 && at + n <= input.len());
        at += n;
    }
    let mut out = Vec::new();
    let _ = layer.seal(rest, &mut out);
    let _ = layer.seal_alert(0, &mut out);
    let _ = layer.seal_key_update(&mut out);
});
