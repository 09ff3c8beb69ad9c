//! Finding a byte in a request value eight bytes at a time.
//!
//! Reading a cookie or a query parameter is a search for separators (`;`, `&`, `=`,
//! `?`, `#`) in a header value. Byte by byte, in the size-optimized module, that search
//! was most of what a cookie or query condition costs (`make bench-costs`: about 24
//! interpreter instructions per byte of a `cookie` header). Here a 64-bit word is tested
//! for the byte at once: the classic "has a zero byte" test on the word XORed with the
//! byte repeated eight times (wasm32 has 64-bit integers, so this is a handful of
//! instructions per word). [`find_either`] looks for two bytes in the same pass: where a
//! query starts (`?`), unless a fragment (`#`) comes first.

/// `0x01` in every byte.
const ONES: u64 = 0x0101_0101_0101_0101;
/// `0x80` in every byte.
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The index of the first `byte` in `haystack`.
#[inline(always)]
pub fn find_byte(haystack: &[u8], byte: u8) -> Option<usize> {
    let repeated = ONES.wrapping_mul(u64::from(byte));
    find(haystack, |word| zero_bytes(word ^ repeated), |b| b == byte)
}

/// The index of the first `a` or `b` in `haystack`, in one pass.
#[inline(always)]
pub fn find_either(haystack: &[u8], a: u8, b: u8) -> Option<usize> {
    let (repeated_a, repeated_b) = (
        ONES.wrapping_mul(u64::from(a)),
        ONES.wrapping_mul(u64::from(b)),
    );
    find(
        haystack,
        |word| zero_bytes(word ^ repeated_a) | zero_bytes(word ^ repeated_b),
        |byte| byte == a || byte == b,
    )
}

/// The first byte of `haystack` that `in_word` marks (its top bit set in the word of
/// eight bytes read little-endian, maybe with bits above it) and `is_it` accepts.
#[inline(always)]
fn find(
    haystack: &[u8],
    in_word: impl Fn(u64) -> u64,
    is_it: impl Fn(u8) -> bool,
) -> Option<usize> {
    let mut at = 0;
    // Indexing by hand: at `opt-level = "z"` the iterator over words (`chunks_exact`)
    // and the slice-to-array conversion stay calls, twice the price of the test.
    while let Some(&[b0, b1, b2, b3, b4, b5, b6, b7]) = haystack.get(at..at + 8) {
        let marked = in_word(u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]));
        if marked != 0 {
            return Some(at + (marked.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    while let Some(byte) = haystack.get(at) {
        if is_it(*byte) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// The top bit of the first zero byte of `word` set, maybe with some above it: the
/// lowest byte whose top bit is set is the first zero byte (a borrow can only mark bytes
/// above a true zero). XORed with a byte repeated eight times, a word's zero bytes are
/// that byte's places.
#[inline(always)]
fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGHS
}

/// True when every byte of `bytes` is ASCII (below 0x80), eight at a time: a word's
/// non-ASCII bytes are the ones with their top bit set.
#[inline(always)]
pub fn is_ascii(bytes: &[u8]) -> bool {
    find(bytes, |word| word & HIGHS, |byte| !byte.is_ascii()).is_none()
}

/// `haystack` up to the first `byte` (all of it when there is none), and what follows
/// that byte (`None` when there is none).
#[inline(always)]
pub fn split_at_byte(haystack: &[u8], byte: u8) -> (&[u8], Option<&[u8]>) {
    match find_byte(haystack, byte) {
        Some(at) => (&haystack[..at], haystack.get(at + 1..)),
        None => (haystack, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_occurrence_at_every_offset_and_length() {
        // Every length up to three words, the byte at every place, with and without a
        // later copy, among bytes that differ from it by one bit (borrow cases) or are
        // 0x00 / 0xff.
        for byte in [b';', b'&', 0x00, 0x80, 0xff, 0x01] {
            for len in 0..=24 {
                for filler in [byte ^ 1, byte ^ 0x80, 0x00, 0xff, byte.wrapping_add(1)] {
                    if filler == byte {
                        continue;
                    }
                    let plain = vec![filler; len];
                    assert_eq!(find_byte(&plain, byte), None, "{byte} {len} {filler}");
                    for at in 0..len {
                        let mut bytes = plain.clone();
                        bytes[at] = byte;
                        assert_eq!(find_byte(&bytes, byte), Some(at));
                        for later in at + 1..len {
                            let mut twice = bytes.clone();
                            twice[later] = byte;
                            assert_eq!(find_byte(&twice, byte), Some(at));
                        }
                    }
                }
            }
        }
    }

    /// 20,000 byte strings shorter than 40 bytes (five words), drawn from `alphabet` by
    /// a fixed xorshift generator: small alphabets, so that the bytes sought appear
    /// often, at random places.
    fn drawn(mut state: u64, alphabet: &'static [u8]) -> impl Iterator<Item = Vec<u8>> {
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..20_000).map(move |_| {
            let len = next() % 40;
            (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect()
        })
    }

    #[test]
    fn agrees_with_a_plain_search_on_drawn_bytes() {
        for bytes in drawn(0x9e37_79b9_7f4a_7c15, b";=& a\x00\xff") {
            for byte in [b';', b'=', b'&', 0x00, 0xff, b'x'] {
                assert_eq!(
                    find_byte(&bytes, byte),
                    bytes.iter().position(|b| *b == byte),
                    "{bytes:?} {byte}"
                );
            }
        }
    }

    #[test]
    fn finds_the_first_of_two_bytes() {
        for bytes in drawn(0x2545_f491_4f6c_dd1d, b"?#/a\x00") {
            assert_eq!(
                find_either(&bytes, b'?', b'#'),
                bytes.iter().position(|b| *b == b'?' || *b == b'#'),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn tells_ascii_as_the_standard_library_does() {
        for bytes in drawn(0x8f1b_bcdc_c2b3_27a5, b"az-:\x7f\x80\xc3\xa9") {
            assert_eq!(is_ascii(&bytes), bytes.is_ascii(), "{bytes:?}");
        }
        // One non-ASCII byte at every place of three words.
        for len in 1..=24 {
            for at in 0..len {
                let mut bytes = vec![b'a'; len];
                bytes[at] = 0x80;
                assert!(!is_ascii(&bytes), "{len} {at}");
            }
            assert!(is_ascii(&vec![0x7f; len]));
        }
    }

    #[test]
    fn splits_around_the_first_occurrence() {
        assert_eq!(split_at_byte(b"a=1", b'='), (&b"a"[..], Some(&b"1"[..])));
        assert_eq!(split_at_byte(b"a=", b'='), (&b"a"[..], Some(&b""[..])));
        assert_eq!(split_at_byte(b"a", b'='), (&b"a"[..], None));
        assert_eq!(split_at_byte(b"", b'='), (&b""[..], None));
        assert_eq!(split_at_byte(b"=a=b", b'='), (&b""[..], Some(&b"a=b"[..])));
    }
}
