//! The decoder of Envoy's serialized header maps (`meshcanary_policy::headers`, the
//! filter's `host::request_headers`). On arbitrary bytes: no panic; every pair lies
//! inside the data; never more pairs than the count says; decoding is idempotent through
//! the encoder (decode ∘ encode ∘ decode = decode); `get` is the first pair of that
//! name. On pairs built from the same input: decode(encode(pairs)) = pairs, and every
//! truncation of the encoding decodes to a prefix of the pairs.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use meshcanary_policy::headers::{encode, HeaderMap};

fn decoded(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    HeaderMap::from_bytes(bytes.to_vec())
        .pairs()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // Arbitrary bytes, as a (hostile or broken) host might hand them over.
    let map = HeaderMap::from_bytes(data.to_vec());
    let pairs: Vec<(&[u8], &[u8])> = map.pairs().collect();
    let declared = data
        .get(..4)
        .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize);
    assert!(pairs.len() <= declared, "more pairs than declared");
    assert_eq!(map.as_bytes(), data);
    let range = map.as_bytes().as_ptr_range();
    for (name, value) in &pairs {
        for part in [name, value] {
            let r = part.as_ptr_range();
            assert!(
                range.start <= r.start && r.end <= range.end,
                "pair outside the data"
            );
        }
    }
    for (name, _) in &pairs {
        if let Ok(name) = std::str::from_utf8(name) {
            let first = pairs
                .iter()
                .find(|(n, _)| *n == name.as_bytes())
                .map(|(_, v)| *v);
            assert_eq!(map.get(name), first, "get is not the first value");
        }
    }
    let reencoded = encode(&pairs).expect("fits: decoded from less than 4 GiB");
    let owned: Vec<(Vec<u8>, Vec<u8>)> = pairs
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(
        decoded(&reencoded),
        owned,
        "decode . encode . decode != decode"
    );
    if data.len() >= 4 && pairs.len() == declared {
        // Every declared pair was read: the map re-encodes to its own bytes, except the
        // NUL separators, which the decoder does not check (the last may even be missing).
        let mut masked = data.to_vec();
        let mut at = 4 + 8 * pairs.len();
        for (name, value) in &pairs {
            for len in [name.len(), value.len()] {
                at += len;
                if let Some(b) = masked.get_mut(at) {
                    *b = 0;
                }
                at += 1;
            }
        }
        assert!(reencoded.len() <= data.len() + 1);
        let common = reencoded.len().min(data.len());
        assert_eq!(reencoded[..common], masked[..common], "re-encoding differs");
    }

    // Pairs built from the same bytes: the encoder and the decoder are inverses.
    let u = Unstructured::new(data);
    let built: Vec<(Vec<u8>, Vec<u8>)> = match Vec::arbitrary_take_rest(u) {
        Ok(p) => p,
        Err(_) => return,
    };
    let bytes = encode(&built).expect("small input");
    assert_eq!(decoded(&bytes), built, "decode . encode != identity");
    let map = HeaderMap::from_bytes(bytes.clone());
    for (name, _) in &built {
        if let Ok(name) = std::str::from_utf8(name) {
            let first = built
                .iter()
                .find(|(n, _)| n == name.as_bytes())
                .map(|(_, v)| v.as_slice());
            assert_eq!(map.get(name), first);
        }
    }
    // Truncations (a host cut short): always a prefix of the pairs. Checked at a few
    // cuts, not all, to keep each run fast.
    let step = (bytes.len() / 16).max(1);
    for cut in (0..bytes.len()).step_by(step) {
        let got = decoded(&bytes[..cut]);
        assert!(got.len() <= built.len());
        assert_eq!(got[..], built[..got.len()], "a truncation is not a prefix");
    }
});
