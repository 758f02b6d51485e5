#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| genie_transport::fuzzing::rdma_wire(data));
