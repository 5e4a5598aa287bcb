#![no_main]
//! libFuzzer entry point; the harness is `mm_fuzz::requests`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mm_fuzz::requests(data));
