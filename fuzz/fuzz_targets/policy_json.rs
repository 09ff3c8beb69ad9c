//! The policy document from arbitrary bytes: `Policy::from_json` never panics, answers
//! the same twice, names a problem when it refuses, and a policy it accepts is
//! consistent and survives re-serialization (compact, pretty, inside the ECDS message).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshcanary_fuzz::check_policy_bytes(data);
});
