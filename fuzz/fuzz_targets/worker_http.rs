//! Any bytes as what a client sends to a worker, delivered in two reads (the first byte picks
//! where the second starts): the parser must not panic, not hang (libFuzzer's -timeout), and
//! parse the same requests however the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    // Scale the byte to the input so every split point is reachable for short inputs and
    // long inputs still get splits past byte 255.
    let split_at = usize::from(split) * input.len() / 255;
    sluice_worker::fuzzing::parse_stream(input, split_at);
});
