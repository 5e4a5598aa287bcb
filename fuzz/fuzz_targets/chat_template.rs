#![no_main]
//! libFuzzer entry point; the harness is `mm_fuzz::chat_template`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mm_fuzz::chat_template(data));
