#![no_main]
//! libFuzzer entry point; the harness is `mm_fuzz::tokenizer`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mm_fuzz::tokenizer(data));
