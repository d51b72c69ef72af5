//! Any bytes as what a pool writes back on a delivery channel (a compromised pool writes
//! anything): the response head is judged or refused without panicking, the body framer
//! never counts more bytes than it was given, and fed the body in two pieces it agrees with
//! itself fed the body whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::delivery::framing::response_head;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let Ok(Some(head)) = response_head(data, flags & 1 == 1) else {
        return;
    };
    assert!(head.head_len <= data.len());
    let body = &data[head.head_len..];
    let whole = head.body.clone().advance(body);
    if let Ok(n) = whole {
        assert!(n <= body.len(), "counted {n} of {} bytes", body.len());
    }
    let cut = usize::from(flags >> 1).min(body.len());
    let mut f = head.body.clone();
    let split = f.advance(&body[..cut]).and_then(|a| {
        if a == cut {
            f.advance(&body[cut..]).map(|b| a + b)
        } else {
            Ok(a)
        }
    });
    match (whole, split) {
        (Ok(n), Ok(m)) => assert_eq!(n, m, "whole {n}, split at {cut} {m}"),
        (Err(_), Err(_)) => {}
        (w, s) => panic!("whole {w:?}, split at {cut} {s:?}"),
    }
});
