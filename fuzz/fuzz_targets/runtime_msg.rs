#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| genie_runtime::proto::fuzz_decode(data));
