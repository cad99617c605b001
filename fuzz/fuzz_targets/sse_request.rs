//! libFuzzer entry point for `tidings_fuzz::sse_request`; the checks live in the library so the
//! stable smoke tests (.ci/fuzz-smoke) run exactly the same code.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidings_fuzz::sse_request(data));
