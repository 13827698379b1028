#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mirrord_fuzz_targets::http_filter::run(data));
