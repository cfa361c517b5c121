//! Any frame body as a request: parsed, and an alloc's layout checked against the limits, as
//! a session does before it creates anything.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_protocol::{parse_request, Limits, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(Request::Alloc { layout, .. }) = parse_request(data) {
        if let Ok(l) = layout.resolve(&Limits::default()) {
            // A layout that passed must describe a buffer within the limits.
            assert!(l.byte_len() <= Limits::default().max_buffer_bytes);
        }
    }
});
