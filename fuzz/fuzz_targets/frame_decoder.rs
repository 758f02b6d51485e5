#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| genie_transport::fuzzing::decode_frame(data));
