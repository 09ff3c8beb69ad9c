//! Sticky bucketing: turns (salt, key) into a variant, the same way on every worker,
//! every Envoy and in the controller.
//!
//! Two hash schemes are offered:
//!
//! * [`HashKind::Fnv`] (default): `h = fmix64(FNV-1a-64(salt ‖ 0x00 ‖ key))`. FNV-1a alone
//!   mixes the last bytes of a key poorly into the high bits, and the high bits are what
//!   picks the bucket, so MurmurHash3's 64-bit finalizer (`fmix64`) spreads them first.
//!   The first listed variant owns positions `[0, w0/total)`; everyone else is placed
//!   among the remaining variants by a second, independent position derived from `h`.
//!   So raising the first variant's weight only moves users *into* it, and users outside
//!   it keep their variant as long as the other variants keep their relative weights.
//! * [`HashKind::Flagd`]: exactly flagd's `fractional` operation — MurmurHash3 x86 32-bit
//!   (seed 0) over the canonical CBOR encoding of the array `[salt, key]`,
//!   `bucket = (hash × total) >> 32`, and the first variant whose cumulative weight exceeds
//!   the bucket wins. Only the first listed variant is guaranteed stable on a ramp.

use std::hash::Hasher;

/// Which function maps a key to a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// FNV-1a 64-bit with a finalizer, two-stage placement (see the module docs).
    Fnv,
    /// flagd's `fractional` bucketing, for agreement with OpenFeature flags in the app.
    Flagd,
}

/// Largest total weight a split may have; flagd accepts 1 … 2³¹−1 and so do we.
pub const MAX_TOTAL_WEIGHT: u64 = (1 << 31) - 1;

/// A validated list of relative weights: at least one is positive and the total fits
/// [`MAX_TOTAL_WEIGHT`]. Indices refer to the split's own listing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    weights: Vec<u64>,
    total: u64,
}

impl Weights {
    /// Builds the table; `None` when the total is 0 or above [`MAX_TOTAL_WEIGHT`].
    pub fn new(weights: Vec<u64>) -> Option<Weights> {
        let total = weights
            .iter()
            .try_fold(0u64, |acc, w| acc.checked_add(*w))?;
        if total == 0 || total > MAX_TOTAL_WEIGHT {
            return None;
        }
        Some(Weights { weights, total })
    }

    /// The weights, in listing order.
    pub fn as_slice(&self) -> &[u64] {
        &self.weights
    }

    /// Sum of all weights.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Picks an entry for a uniformly distributed 64-bit position (FNV scheme, random).
    pub fn pick_u64(&self, h: u64) -> usize {
        let first = self.weights[0];
        if scale_u64(h, self.total) < first {
            return 0;
        }
        let rest_total = self.total - first;
        // Only one other variant with weight: no second draw needed.
        let second = fmix64(h ^ 0x9e37_79b9_7f4a_7c15);
        let bucket = scale_u64(second, rest_total);
        1 + cumulative_pick(&self.weights[1..], bucket)
    }

    /// Picks an entry the way flagd's `fractional` does for a 32-bit hash.
    pub fn pick_u32(&self, h: u32) -> usize {
        let bucket = (u64::from(h) * self.total) >> 32;
        cumulative_pick(&self.weights, bucket)
    }
}

/// `floor(h / 2⁶⁴ × n)`: the bucket of `h` among `n`, using the high bits.
fn scale_u64(h: u64, n: u64) -> u64 {
    ((u128::from(h) * u128::from(n)) >> 64) as u64
}

/// Index of the first entry whose cumulative weight exceeds `bucket`.
fn cumulative_pick(weights: &[u64], bucket: u64) -> usize {
    let mut upper = 0u64;
    for (i, w) in weights.iter().enumerate() {
        upper += w;
        if bucket < upper {
            return i;
        }
    }
    // Unreachable while bucket < total; the last positive entry is the safe answer.
    weights.iter().rposition(|w| *w > 0).unwrap_or(0)
}

/// The default sticky position of a key: `fmix64(FNV-1a-64(salt ‖ 0x00 ‖ key))`.
pub fn fnv_position(salt: &[u8], key: &[u8]) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(salt);
    hasher.write(&[0]);
    hasher.write(key);
    fmix64(hasher.finish())
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// flagd's hash of a (flag key, targeting key) pair: MurmurHash3 x86 32-bit, seed 0,
/// over the canonical CBOR encoding of the two-element text array `[salt, key]`.
///
/// A key that is not valid UTF-8 cannot be a CBOR text string; its bytes are encoded
/// as they are, which no flagd client can produce, so no agreement is lost.
pub fn flagd_hash(salt: &[u8], key: &[u8]) -> u32 {
    let mut encoded = Vec::with_capacity(salt.len() + key.len() + 10);
    encoded.push(0x82); // array of two items
    cbor_text_header(&mut encoded, salt.len());
    encoded.extend_from_slice(salt);
    cbor_text_header(&mut encoded, key.len());
    encoded.extend_from_slice(key);
    murmur3_x86_32(&encoded, 0)
}

/// Appends the CBOR head of a text string (major type 3) of `len` bytes, shortest form.
fn cbor_text_header(out: &mut Vec<u8>, len: usize) {
    const TEXT: u8 = 3 << 5;
    let len = len as u64;
    if len < 24 {
        out.push(TEXT | len as u8);
    } else if len <= 0xff {
        out.push(TEXT | 24);
        out.push(len as u8);
    } else if len <= 0xffff {
        out.push(TEXT | 25);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else if len <= 0xffff_ffff {
        out.push(TEXT | 26);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    } else {
        out.push(TEXT | 27);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// MurmurHash3 x86 32-bit (Austin Appleby's public-domain algorithm).
pub fn murmur3_x86_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, byte) in tail.iter().enumerate() {
            k |= u32::from(*byte) << (8 * i);
        }
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_reference_vectors() {
        // Published MurmurHash3_x86_32 vectors.
        assert_eq!(murmur3_x86_32(b"", 0), 0);
        assert_eq!(murmur3_x86_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_x86_32(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3_x86_32(b"\0\0\0\0", 0), 0x2362_f9de);
        assert_eq!(murmur3_x86_32(b"aaaa", 0x9747_b28c), 0x5a97_808a);
        assert_eq!(murmur3_x86_32(b"abc", 0), 0xb3dd_93fa);
        assert_eq!(murmur3_x86_32(b"Hello, world!", 0x9747_b28c), 0x2488_4cba);
        assert_eq!(
            murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    #[test]
    fn flagd_example_from_field_notes() {
        let mut encoded = vec![0x82];
        cbor_text_header(&mut encoded, 11);
        encoded.extend_from_slice(b"checkout-v2");
        cbor_text_header(&mut encoded, 7);
        encoded.extend_from_slice(b"user-42");
        let hex: String = encoded.iter().map(|b| format!("{:02x}", b)).collect();
        assert_eq!(hex, "826b636865636b6f75742d763267757365722d3432");
        let h = flagd_hash(b"checkout-v2", b"user-42");
        assert_eq!(h, 947_885_791);
        let weights = Weights::new(vec![10, 90]).expect("valid weights");
        assert_eq!((u64::from(h) * 100) >> 32, 22);
        assert_eq!(weights.pick_u32(h), 1);
    }

    #[test]
    fn cbor_length_heads_use_shortest_form() {
        let head = |len| {
            let mut v = Vec::new();
            cbor_text_header(&mut v, len);
            v
        };
        assert_eq!(head(0), vec![0x60]);
        assert_eq!(head(23), vec![0x77]);
        assert_eq!(head(24), vec![0x78, 24]);
        assert_eq!(head(255), vec![0x78, 255]);
        assert_eq!(head(256), vec![0x79, 1, 0]);
        assert_eq!(head(65_535), vec![0x79, 0xff, 0xff]);
        assert_eq!(head(65_536), vec![0x7a, 0, 1, 0, 0]);
    }

    #[test]
    fn weights_reject_zero_and_oversized_totals() {
        assert!(Weights::new(vec![0, 0]).is_none());
        assert!(Weights::new(vec![]).is_none());
        assert!(Weights::new(vec![MAX_TOTAL_WEIGHT, 1]).is_none());
        assert!(Weights::new(vec![u64::MAX, 2]).is_none());
        assert!(Weights::new(vec![MAX_TOTAL_WEIGHT]).is_some());
    }

    #[test]
    fn zero_weight_entries_are_never_picked() {
        let w = Weights::new(vec![0, 5, 0, 5, 0]).expect("valid");
        for i in 0..20_000u64 {
            let h = fmix64(i);
            let picked = w.pick_u64(h);
            assert!(picked == 1 || picked == 3, "picked {picked}");
            let picked = w.pick_u32(h as u32);
            assert!(picked == 1 || picked == 3, "picked {picked}");
        }
        assert_eq!(w.pick_u32(u32::MAX), 3);
        assert_eq!(w.pick_u32(0), 1);
    }

    #[test]
    fn raising_the_first_weight_only_moves_users_into_it() {
        // Three variants: the other two keep their 1:2 ratio while the first grows.
        let steps = [
            vec![0, 100, 200],
            vec![5, 95, 190],
            vec![25, 25, 50],
            vec![90, 10, 20],
            vec![1, 0, 0],
        ];
        let tables: Vec<Weights> = steps
            .iter()
            .map(|w| Weights::new(w.clone()).expect("valid"))
            .collect();
        for user in 0..50_000u64 {
            let h = fnv_position(b"salt", user.to_string().as_bytes());
            let picks: Vec<usize> = tables.iter().map(|t| t.pick_u64(h)).collect();
            for pair in picks.windows(2) {
                let (before, after) = (pair[0], pair[1]);
                assert!(
                    before == after || after == 0,
                    "user {user} moved {before} -> {after}"
                );
            }
        }
    }

    #[test]
    fn flagd_first_variant_is_monotone_too() {
        let low = Weights::new(vec![10, 90]).expect("valid");
        let high = Weights::new(vec![30, 70]).expect("valid");
        for user in 0..50_000u64 {
            let h = flagd_hash(b"salt", user.to_string().as_bytes());
            if low.pick_u32(h) == 0 {
                assert_eq!(high.pick_u32(h), 0, "user {user} left the first variant");
            }
        }
    }

    #[test]
    fn fnv_shares_follow_weights() {
        let w = Weights::new(vec![10, 60, 30]).expect("valid");
        let mut counts = [0u32; 3];
        let n = 100_000u32;
        for user in 0..n {
            let h = fnv_position(b"checkout-v2", format!("user-{user}").as_bytes());
            counts[w.pick_u64(h)] += 1;
        }
        let shares: Vec<f64> = counts
            .iter()
            .map(|c| f64::from(*c) / f64::from(n))
            .collect();
        for (share, expected) in shares.iter().zip([0.1, 0.6, 0.3]) {
            assert!((share - expected).abs() < 0.006, "shares {shares:?}");
        }
    }
}
