#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| genie_scheduler::fuzzing::graph_json(data));
