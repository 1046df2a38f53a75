//! `hf_config`: see fuzz/README.md. Every input must end in Ok or an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = formers::fuzzing::hf_config(data);
});
