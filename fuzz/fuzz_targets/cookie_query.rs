//! Cookie and query parsing (`meshcanary_policy::decide::{cookie_value, query_value}`).
//!
//! On arbitrary bytes: no panic; a cookie value is a slice of the header that holds no
//! `;`; a decoded query value is never longer than the path, and a path without `?`
//! has no parameters. On headers built from the same input: a cookie header written
//! with RFC 6265 syntax (optionally quoted values, optional spaces) gives back each
//! name's first value; a query string written with percent-encoding (and `+` for
//! spaces, and a fragment after it) gives back each name's first value, exactly.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use meshcanary_policy::decide::{cookie_value, query_value};

#[derive(Arbitrary, Debug)]
struct Built {
    cookies: Vec<(Vec<u8>, Vec<u8>, bool)>,
    params: Vec<(Vec<u8>, Vec<u8>, bool)>,
    fragment: Option<Vec<u8>>,
    spaces: bool,
}

/// RFC 9110 `tchar`: what a cookie name is made of.
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 6265 `cookie-octet`.
fn cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

fn percent_encode(bytes: &[u8], plus_for_space: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else if b == b' ' && plus_for_space {
            out.push(b'+');
        } else {
            out.extend_from_slice(format!("%{:02X}", b).as_bytes());
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // Arbitrary bytes: the first line is the name, the rest the header / path.
    let (name, header) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"uid"[..], data),
    };
    if let Some(v) = cookie_value(header, name) {
        let (h, r) = (header.as_ptr_range(), v.as_ptr_range());
        assert!(
            h.start <= r.start && r.end <= h.end,
            "cookie value outside the header"
        );
        assert!(!v.contains(&b';'), "cookie value spans pairs");
    }
    if let Some(v) = query_value(header, name) {
        assert!(
            v.len() <= header.len(),
            "decoded value longer than the path"
        );
        assert!(header.contains(&b'?'), "a parameter without a query");
    }

    // Built with the syntax the parsers promise to read.
    let u = Unstructured::new(data);
    let built = match Built::arbitrary_take_rest(u) {
        Ok(b) => b,
        Err(_) => return,
    };
    let cookies: Vec<(Vec<u8>, Vec<u8>, bool)> = built
        .cookies
        .into_iter()
        .map(|(n, v, quoted)| {
            let n: Vec<u8> = n.into_iter().filter(|b| tchar(*b) && *b != b'=').collect();
            let v: Vec<u8> = v.into_iter().filter(|b| cookie_octet(*b)).collect();
            (n, v, quoted)
        })
        .filter(|(n, _, _)| !n.is_empty())
        .collect();
    let separator: &[u8] = if built.spaces { b" ;  " } else { b"; " };
    let mut header = Vec::new();
    for (i, (n, v, quoted)) in cookies.iter().enumerate() {
        if i > 0 {
            header.extend_from_slice(separator);
        }
        header.extend_from_slice(n);
        header.push(b'=');
        if *quoted {
            header.push(b'"');
        }
        header.extend_from_slice(v);
        if *quoted {
            header.push(b'"');
        }
    }
    for (n, _, _) in &cookies {
        let first = cookies
            .iter()
            .find(|(m, _, _)| m == n)
            .map(|(_, v, _)| v.as_slice());
        assert_eq!(
            cookie_value(&header, n),
            first,
            "cookie {:?} in {:?}",
            String::from_utf8_lossy(n),
            String::from_utf8_lossy(&header)
        );
    }

    let params: Vec<&(Vec<u8>, Vec<u8>, bool)> = built
        .params
        .iter()
        .filter(|(n, _, _)| !n.is_empty())
        .collect();
    let mut path = b"/p?".to_vec();
    for (i, (n, v, plus)) in params.iter().enumerate() {
        if i > 0 {
            path.push(b'&');
        }
        path.extend_from_slice(&percent_encode(n, *plus));
        path.push(b'=');
        path.extend_from_slice(&percent_encode(v, *plus));
    }
    if let Some(fragment) = &built.fragment {
        path.push(b'#');
        path.extend_from_slice(fragment);
    }
    for (n, _, _) in &params {
        let first = params
            .iter()
            .find(|(m, _, _)| m == n)
            .map(|(_, v, _)| v.clone());
        assert_eq!(
            query_value(&path, n),
            first,
            "parameter {:?} in {:?}",
            String::from_utf8_lossy(n),
            String::from_utf8_lossy(&path)
        );
    }
});
