//! Any bytes as a control message, in either direction: decoding never panics, and whatever
//! decodes encodes to bytes that decode to the same message (so both sides read one meaning
//! into every message they accept). Nothing a worker sends may take the front end down.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proto::control::{ToFrontend, ToWorker};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ToWorker::decode(data) {
        assert_eq!(ToWorker::decode(&m.encode()), Ok(m));
    }
    if let Ok(m) = ToFrontend::decode(data) {
        assert_eq!(ToFrontend::decode(&m.encode()), Ok(m.clone()));
        match m {
            ToFrontend::Cache { key, response } => {
                assert!(key.is_valid());
                // What the front end does next with a publication: check it, never panic.
                let _ = sluice_proto::cache::check_response(&response, 1 << 20);
            }
            // What the access-log writer does with each line: an entry is clean text.
            ToFrontend::Access(lines) => {
                for l in lines.lines() {
                    if let Some(e) = sluice_proto::access::Entry::decode(l) {
                        for t in [
                            e.method,
                            e.target,
                            e.protocol,
                            e.host,
                            e.referer,
                            e.user_agent,
                        ] {
                            assert!(sluice_proto::access::is_clean(t) || t.is_empty());
                        }
                    }
                }
            }
            _ => {}
        }
    }
});
