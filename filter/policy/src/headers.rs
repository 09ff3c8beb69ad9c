//! Header maps as the proxy-wasm ABI serializes them (`proxy_get_header_map_pairs`):
//! `count: u32`, then `count` × (`name_len: u32`, `value_len: u32`), then each name and
//! value followed by a NUL byte (all integers little-endian).
//!
//! The filter reads the whole request map in one host call and decodes it here, in
//! place; the decoder is pure so that it is tested natively and fuzzed (see `fuzz/`).

/// A serialized header map, read in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    bytes: Vec<u8>,
}

impl HeaderMap {
    /// A map over already serialized bytes (what the host handed over).
    pub fn from_bytes(bytes: Vec<u8>) -> HeaderMap {
        HeaderMap { bytes }
    }

    /// The serialized bytes, as the host handed them over.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The pairs in the host's order. Malformed data (which Envoy does not produce) ends
    /// the iteration early instead of panicking: every pair returned lies whole inside
    /// the data, so a truncated map yields a prefix of its pairs.
    pub fn pairs(&self) -> Pairs<'_> {
        let count = read_u32(&self.bytes, 0).unwrap_or(0);
        Pairs {
            bytes: &self.bytes,
            remaining: count,
            index: 0,
            data: 4usize.saturating_add(count.saturating_mul(8)),
        }
    }

    /// The first value of header `name` (lower-case, as Envoy holds names), like the
    /// host's own single-header read.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.pairs()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The first value of each of `names` (lower-case), in one walk over the map: what
    /// the filter reads per request. One [`get`](Self::get) per name would walk the map
    /// once per name, and decoding a pair is most of what a lookup costs.
    pub fn select<N: AsRef<str>>(&self, names: &[N]) -> Vec<Option<&[u8]>> {
        let mut found: Vec<Option<&[u8]>> = vec![None; names.len()];
        self.select_into(names, &mut found);
        found
    }

    /// As [`select`](Self::select), into `found` (aligned with `names`, all `None`): the
    /// filter passes a buffer on its stack, so a request allocates nothing for it.
    pub fn select_into<'m, N: AsRef<str>>(&'m self, names: &[N], found: &mut [Option<&'m [u8]>]) {
        let mut missing = names.len().min(found.len());
        // The lengths of the names wanted, one bit each (63 stands for 63 and longer):
        // most headers of a request have a length no wanted name has, and are passed
        // over on one test instead of a comparison with every name.
        let lengths = names
            .iter()
            .fold(0u64, |bits, name| bits | length_bit(name.as_ref().len()));
        for (name, value) in self.pairs() {
            if missing == 0 {
                break;
            }
            if lengths & length_bit(name.len()) == 0 {
                continue;
            }
            for (slot, wanted) in found.iter_mut().zip(names) {
                let wanted = wanted.as_ref().as_bytes();
                if wanted.len() == name.len() && slot.is_none() && name == wanted {
                    *slot = Some(value);
                    missing -= 1;
                }
            }
        }
    }
}

/// The bit standing for names of `length` bytes in [`HeaderMap::select_into`].
fn length_bit(length: usize) -> u64 {
    1 << length.min(63)
}

/// Iterator over a [`HeaderMap`]'s (name, value) pairs.
pub struct Pairs<'a> {
    bytes: &'a [u8],
    remaining: usize,
    index: usize,
    /// Offset of the next name in the data section.
    data: usize,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let pair = (|| {
            let sizes = self.index.checked_mul(8)?.checked_add(4)?;
            let name_len = read_u32(self.bytes, sizes)?;
            let value_len = read_u32(self.bytes, sizes.checked_add(4)?)?;
            let name_end = self.data.checked_add(name_len)?;
            let value_start = name_end.checked_add(1)?;
            let value_end = value_start.checked_add(value_len)?;
            let name = self.bytes.get(self.data..name_end)?;
            let value = self.bytes.get(value_start..value_end)?;
            Some((name, value, value_end.checked_add(1)?))
        })();
        match pair {
            Some((name, value, next)) => {
                self.remaining -= 1;
                self.index += 1;
                self.data = next;
                Some((name, value))
            }
            None => {
                self.remaining = 0;
                None
            }
        }
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    // Byte by byte rather than `copy_from_slice`: in the wasm module that is a call to
    // `memcpy` for four bytes, which made decoding a pair several times dearer
    // (bench/costs).
    match bytes.get(at..at.checked_add(4)?)? {
        [a, b, c, d] => usize::try_from(u32::from_le_bytes([*a, *b, *c, *d])).ok(),
        _ => None,
    }
}

/// Serializes pairs exactly as the host does: the inverse of [`HeaderMap::pairs`]. The
/// filter never needs it (the host encodes); tests and the fuzz targets check the decoder
/// against it. `None` when a count or length does not fit the format's `u32`.
pub fn encode<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Option<Vec<u8>> {
    let mut out = u32::try_from(pairs.len()).ok()?.to_le_bytes().to_vec();
    for (name, value) in pairs {
        out.extend_from_slice(&u32::try_from(name.as_ref().len()).ok()?.to_le_bytes());
        out.extend_from_slice(&u32::try_from(value.as_ref().len()).ok()?.to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_ref());
        out.push(0);
        out.extend_from_slice(value.as_ref());
        out.push(0);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        encode(pairs).unwrap()
    }

    #[test]
    fn reads_pairs_in_order_and_finds_the_first_value() {
        let bytes = serialize(&[
            (b":path", b"/a?b=1"),
            (b"x-dup", b"first"),
            (b"empty", b""),
            (b"x-dup", b"second"),
            (b"bin", &[0xff, 0x00, 0xfe]),
        ]);
        let map = HeaderMap::from_bytes(bytes);
        let names: Vec<&[u8]> = map.pairs().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            vec![&b":path"[..], b"x-dup", b"empty", b"x-dup", b"bin"]
        );
        assert_eq!(map.get(":path"), Some(&b"/a?b=1"[..]));
        assert_eq!(map.get("x-dup"), Some(&b"first"[..]));
        assert_eq!(map.get("empty"), Some(&b""[..]));
        assert_eq!(map.get("bin"), Some(&[0xff, 0x00, 0xfe][..]));
        assert_eq!(map.get("absent"), None);
    }

    #[test]
    fn select_finds_each_first_value_as_get_does() {
        let map = HeaderMap::from_bytes(serialize(&[
            (b":path", b"/a"),
            (b"x-dup", b"first"),
            (b"cookie", b"a=1"),
            (b"x-dup", b"second"),
        ]));
        let names = ["x-dup", "absent", ":path", "cookie", "x-dup"];
        let expected: Vec<Option<&[u8]>> = names.iter().map(|n| map.get(n)).collect();
        assert_eq!(map.select(&names), expected);
        assert_eq!(map.select(&names)[0], Some(&b"first"[..]));
        assert_eq!(map.select::<&str>(&[]), Vec::<Option<&[u8]>>::new());
        assert_eq!(HeaderMap::default().select(&["x"]), vec![None]);
    }

    #[test]
    fn encode_is_the_inverse_of_pairs_even_with_nul_bytes_inside() {
        // The format is length-prefixed: a NUL inside a name or value is data, not an end.
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"a\0b", b"\0"), (b"", b""), (b"x", b"1\x002\x00")];
        let map = HeaderMap::from_bytes(serialize(&pairs));
        assert_eq!(map.pairs().collect::<Vec<_>>(), pairs);
        assert_eq!(map.get("x"), Some(&b"1\x002\x00"[..]));
        assert_eq!(map.as_bytes(), &serialize(&pairs)[..]);
    }

    #[test]
    fn empty_and_malformed_maps_never_panic() {
        assert_eq!(HeaderMap::default().pairs().count(), 0);
        assert_eq!(HeaderMap::from_bytes(vec![1, 0]).pairs().count(), 0);
        // A count larger than the data: nothing readable, and no panic.
        let mut bytes = serialize(&[(b"a", b"1"), (b"b", b"2")]);
        bytes[0] = 200;
        assert_eq!(HeaderMap::from_bytes(bytes).pairs().count(), 0);
        // Lengths pointing past the end.
        let mut bytes = serialize(&[(b"a", b"1")]);
        bytes[8] = 0xff;
        assert_eq!(HeaderMap::from_bytes(bytes.clone()).pairs().count(), 0);
        // Truncated data: every prefix is handled.
        let full = serialize(&[(b"name", b"value"), (b"other", b"x")]);
        for cut in 0..full.len() {
            let map = HeaderMap::from_bytes(full[..cut].to_vec());
            assert!(map.pairs().count() <= 2);
            let _ = map.get("other");
        }
        let huge = [0xff, 0xff, 0xff, 0xff];
        assert_eq!(HeaderMap::from_bytes(huge.to_vec()).pairs().count(), 0);
    }
}
