//! Frames as a client's socket delivers them: any bytes, read frame after frame until the
//! reader gives up. Must never panic, hang or allocate past the frame limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_protocol::read_frame;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    // A small limit: a frame header claiming more must be refused before any allocation.
    while read_frame(&mut r, 1 << 16).is_ok() {}
});
