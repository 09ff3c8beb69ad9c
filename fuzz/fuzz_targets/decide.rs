//! The per-request decision with arbitrary header, cookie and query values, against the
//! fixed policies (`meshcanary_fuzz::FIXED_POLICIES`): the decision and the mirror choice
//! are deterministic, take the first matching rule, draw at most once (and only when a
//! random placement needs it), never place a request in a zero-weight variant, and a
//! sticky placement is the key's variant whatever the draw. The request reaches the
//! policy both ways the filter reads it (one host read per header, or the whole map
//! serialized as Envoy does and decoded by `HeaderMap`): both give the same inputs.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use meshcanary_policy::headers::{encode, HeaderMap};
use meshcanary_policy::Policy;

#[derive(Arbitrary, Debug)]
struct Request {
    random: u64,
    other_random: u64,
    /// (which header name, value), in the order the client sent them.
    headers: Vec<(u8, Vec<u8>)>,
}

struct Fixed {
    policies: Vec<Policy>,
    /// Every header name any fixed policy reads, plus one none reads.
    names: Vec<String>,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let policies = meshcanary_fuzz::fixed_policies();
        let mut names: Vec<String> = Vec::new();
        for p in &policies {
            for input in &p.inputs {
                if !names.contains(input) {
                    names.push(input.clone());
                }
            }
        }
        names.push("x-unread".to_string());
        Fixed { policies, names }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixed = fixed();
    let u = Unstructured::new(data);
    let request = match Request::arbitrary_take_rest(u) {
        Ok(r) => r,
        Err(_) => return,
    };
    let pairs: Vec<(&str, &[u8])> = request
        .headers
        .iter()
        .map(|(i, v)| {
            (
                fixed.names[*i as usize % fixed.names.len()].as_str(),
                v.as_slice(),
            )
        })
        .collect();
    let map = match encode(&pairs) {
        Some(bytes) => HeaderMap::from_bytes(bytes),
        None => return,
    };
    for policy in &fixed.policies {
        // One host read per header: the first value of each name.
        let one_by_one: Vec<Option<&[u8]>> = policy
            .inputs
            .iter()
            .map(|name| pairs.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
            .collect();
        let from_map: Vec<Option<&[u8]>> = policy.inputs.iter().map(|n| map.get(n)).collect();
        assert_eq!(
            one_by_one, from_map,
            "the two ways of reading headers disagree"
        );
        meshcanary_fuzz::check_request(policy, one_by_one.as_slice(), request.random);
        // A sticky (or fixed) decision does not depend on the draw.
        let a = policy.decide(one_by_one.as_slice(), || request.random);
        let b = policy.decide(one_by_one.as_slice(), || request.other_random);
        let drew = matches!(
            a.placement,
            Some(meshcanary_policy::Placement::Random)
                | Some(meshcanary_policy::Placement::KeyMissingRandom)
        );
        if !drew {
            assert_eq!(a, b, "a decision without a draw changed with the draw");
        }
    }
});
