#![no_main]
//! libFuzzer entry point; the harness is `mm_fuzz::gguf`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mm_fuzz::gguf(data));
