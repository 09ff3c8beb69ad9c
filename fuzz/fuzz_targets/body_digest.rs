//! The mirror's body digest (`meshcanary_policy::mirror::BodyDigest`), which decides
//! `compare: "body"`: the primary's body is digested chunk by chunk as Envoy streams it,
//! the shadow's in one piece, so the digest must not depend on how a body is cut.
//! Checked: any chunking gives the one-piece result; the digest is FNV-1a 64 of the
//! bytes (against an independent implementation here) with the body's length; past the
//! limit it is `None`, at or under it `Some`; an empty body under any limit equals what
//! the filter records for a response without a body (`BodyDigest::new(0).finish()`).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use meshcanary_policy::mirror::BodyDigest;

#[derive(Arbitrary, Debug)]
struct Input {
    limit: u16,
    cuts: Vec<u16>,
    body: Vec<u8>,
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fuzz_target!(|data: &[u8]| {
    let u = Unstructured::new(data);
    let input = match Input::arbitrary_take_rest(u) {
        Ok(i) => i,
        Err(_) => return,
    };
    let body = &input.body;
    // A limit around the body's length half of the time, so both sides of it are hit.
    let limit = if input.limit & 1 == 0 {
        (body.len() + usize::from(input.limit >> 1) % 3).saturating_sub(1)
    } else {
        usize::from(input.limit >> 1)
    };

    let mut whole = BodyDigest::new(limit);
    whole.update(body);
    let expected = if body.len() <= limit {
        Some((fnv1a64(body), body.len()))
    } else {
        None
    };
    assert_eq!(whole.finish(), expected, "one-piece digest");
    assert_eq!(whole.finish(), whole.finish(), "finish is not stable");

    let mut cuts: Vec<usize> = input
        .cuts
        .iter()
        .map(|c| usize::from(*c) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut chunked = BodyDigest::new(limit);
    let mut at = 0;
    for cut in cuts.into_iter().chain(std::iter::once(body.len())) {
        chunked.update(&body[at..cut]); // empty chunks included, as Envoy can send them
        at = cut;
    }
    assert_eq!(chunked.finish(), expected, "chunking changed the digest");

    let mut empty = BodyDigest::new(limit);
    empty.update(&[]);
    assert_eq!(
        empty.finish(),
        BodyDigest::new(0).finish(),
        "empty bodies differ"
    );
});
