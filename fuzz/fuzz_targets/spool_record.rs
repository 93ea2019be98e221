#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_spool::fuzzing::record(data));
