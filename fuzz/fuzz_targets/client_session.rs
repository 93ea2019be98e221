#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_proto::fuzzing::client_session(data));
