//! Shadow traffic: which requests are copied to a shadow service, and what a copy may
//! carry. The host layer sends the copies; everything it decides by is here, pure.

use std::hash::Hasher;

use serde_json::Value;

use crate::bucket::fnv_position;
use crate::decide::RequestInputs;
use crate::policy::{is_token_byte, join, kind, shown, Condition, Decoder, SplitKey};

/// Credential headers that never reach the shadow, whatever the policy says.
pub const ALWAYS_STRIPPED: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
];

/// Hop-by-hop headers (RFC 9110 §7.6.1) and Envoy's internal ones: they describe the
/// downstream connection, not the request, and Envoy sets its own for the copy.
const CONNECTION_HEADERS: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "content-length",
];

/// The [`fingerprint`]s of the fixed lists above and of `:authority`: a header whose
/// fingerprint is not among them is none of them, whatever its case, and skips their
/// comparisons (a copy checks every header of the request).
const FIXED_FINGERPRINTS: u64 =
    fingerprints(&ALWAYS_STRIPPED) | fingerprints(&CONNECTION_HEADERS) | fingerprint(":authority");

/// One bit of 64 for a header name, from its length and its first and last bytes with
/// ASCII case folded (`| 0x20` lowers every letter): names equal but for ASCII case get
/// the same bit, so a bit that is not set rules a name out.
pub const fn fingerprint(name: &str) -> u64 {
    let bytes = name.as_bytes();
    let (first, last) = match bytes.len() {
        0 => (0, 0),
        n => (bytes[0] | 0x20, bytes[n - 1] | 0x20),
    };
    1 << ((bytes.len() * 7 + first as usize + last as usize * 3) % 64)
}

const fn fingerprints(names: &[&str]) -> u64 {
    let mut mask = 0;
    let mut i = 0;
    while i < names.len() {
        mask |= fingerprint(names[i]);
        i += 1;
    }
    mask
}

/// Default methods that are mirrored: the safe ones, which have no side effects.
pub const DEFAULT_METHODS: [&str; 3] = ["GET", "HEAD", "OPTIONS"];

/// Default name of the header that marks a copy.
pub const DEFAULT_MARKER_HEADER: &str = "x-meshcanary-shadow";

/// Largest `max_body_bytes` accepted: copies are held in the filter's memory.
pub const MAX_BODY_LIMIT: u64 = 16 * 1024 * 1024;

const MIRROR_FIELDS: &[&str] = &[
    "cluster",
    "when",
    "percent",
    "methods",
    "strip_headers",
    "marker_header",
    "authority_suffix",
    "max_body_bytes",
    "timeout_ms",
    "max_in_flight",
    "compare",
];

/// How shadow and primary responses are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// Not compared.
    Off,
    /// Status classes (2xx, 5xx …) are compared.
    Status,
    /// Status classes and a hash of the bodies (up to `max_body_bytes`) are compared.
    Body,
}

/// The policy's `mirror` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// Envoy cluster that receives the copies (in Istio: `outbound|PORT|SUBSET|HOST`).
    pub cluster: String,
    /// Conditions a request must meet to be eligible (empty: every request).
    pub when: Vec<Condition>,
    /// Share of eligible requests copied, in millionths (100 % = 1,000,000).
    pub percent_ppm: u32,
    /// Methods that are copied (upper-case as sent); others are skipped and counted.
    pub methods: Vec<String>,
    /// Lower-case headers removed from copies: the credentials plus `strip_headers`.
    pub strip_headers: Vec<String>,
    /// Lower-case header set on every copy to the proxy's copy token; requests carrying it
    /// with that token are never copied and never counted as live.
    pub marker_header: String,
    /// Appended to the host part of `:authority`; `None` keeps it unchanged.
    pub authority_suffix: Option<String>,
    /// Largest request body (and compared response body) in bytes.
    pub max_body_bytes: usize,
    /// Time limit for each copy, in milliseconds.
    pub timeout_ms: u32,
    /// Copies allowed in flight at once, per Envoy worker.
    pub max_in_flight: u32,
    /// How responses are compared.
    pub compare: Compare,
    /// Input index of `:method`.
    pub method_input: usize,
    /// Input index of the marker header.
    pub marker_input: usize,
    /// When the policy has a keyed split, sampling is sticky by that key.
    pub sample_key: Option<SplitKey>,
    /// Derived from `strip_headers` and `marker_header`: their [`fingerprint`]s. A header
    /// whose fingerprint is not among them is none of them and skips their comparisons.
    pub listed_fingerprints: u64,
}

/// The [`fingerprint`]s of `names`, together.
pub fn name_fingerprints<'a>(names: impl IntoIterator<Item = &'a str>) -> u64 {
    names
        .into_iter()
        .fold(0, |mask, name| mask | fingerprint(name))
}

/// What happens to a request with respect to mirroring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorChoice {
    /// Copy it.
    Send,
    /// Eligible, but not copied for this reason (counted).
    Skip(SkipReason),
    /// The `when` conditions do not hold: not a candidate at all (not counted).
    NotEligible,
}

/// What a request's marker header says about it, checked against the token this proxy
/// puts on its copies (see [`Mirror::marker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// No marker header: live traffic.
    Absent,
    /// The marker with this proxy's copy token: one of its own copies, never counted as
    /// live and never copied again.
    Genuine,
    /// A marker header with any other value: sent by a client (or a copy of a policy that
    /// is gone). Counted as live traffic like any request — a marker anyone can set must not
    /// hide requests from the analysis — and counted as forged.
    Forged,
}

/// Why an eligible request was not copied. The host layer adds its own reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The request is itself a copy (it carries the genuine marker): never copied again.
    Marked,
    /// Its method is not in `methods`.
    Method,
    /// `percent` sampling left it out.
    SampledOut,
}

impl Mirror {
    /// Whether the request carries the marker header, and with which value: only
    /// `copy_token`, the value this proxy puts on its own copies, makes it a copy. An empty
    /// token matches nothing.
    pub fn marker<R: RequestInputs + ?Sized>(&self, request: &R, copy_token: &[u8]) -> Marker {
        match request.input(self.marker_input) {
            None => Marker::Absent,
            Some(value) if !copy_token.is_empty() && value == copy_token => Marker::Genuine,
            Some(_) => Marker::Forged,
        }
    }

    /// Decides whether this request is copied, given its [`Mirror::marker`]. `random` is
    /// called only when sampling needs a draw (no sticky key, and 0 % < percent < 100 %).
    pub fn choose<R, F>(&self, request: &R, marker: Marker, random: F) -> MirrorChoice
    where
        R: RequestInputs + ?Sized,
        F: FnOnce() -> u64,
    {
        if marker == Marker::Genuine {
            return MirrorChoice::Skip(SkipReason::Marked);
        }
        if !self.when.iter().all(|c| c.matches(request)) {
            return MirrorChoice::NotEligible;
        }
        let method = request.input(self.method_input).unwrap_or_default();
        if !self.methods.iter().any(|m| m.as_bytes() == method) {
            return MirrorChoice::Skip(SkipReason::Method);
        }
        if self.sampled(request, random) {
            MirrorChoice::Send
        } else {
            MirrorChoice::Skip(SkipReason::SampledOut)
        }
    }

    fn sampled<R: RequestInputs + ?Sized, F: FnOnce() -> u64>(
        &self,
        request: &R,
        random: F,
    ) -> bool {
        const MILLION: u64 = 1_000_000;
        match self.percent_ppm {
            0 => return false,
            p if u64::from(p) >= MILLION => return true,
            _ => {}
        }
        let key = self.sample_key.as_ref().and_then(|k| k.value(request));
        let position = match key {
            // A salt of its own: mirror sampling must not correlate with the routing split.
            Some(key) => fnv_position(b"meshcanary/mirror", key),
            None => random(),
        };
        ((u128::from(position) * u128::from(MILLION)) >> 64) < u128::from(self.percent_ppm)
    }

    /// True when a request header may be copied to the shadow.
    pub fn copies_header(&self, name: &str) -> bool {
        let name_is = |list: &[&str]| list.iter().any(|h| name.eq_ignore_ascii_case(h));
        let print = fingerprint(name);
        !(FIXED_FINGERPRINTS & print != 0
            && (name_is(&ALWAYS_STRIPPED)
                || name_is(&CONNECTION_HEADERS)
                || name.eq_ignore_ascii_case(":authority"))
            || self.listed_fingerprints & print != 0
                && (self
                    .strip_headers
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h))
                    || name.eq_ignore_ascii_case(&self.marker_header))
            || name
                .get(..8)
                .map_or(false, |p| p.eq_ignore_ascii_case("x-envoy-")))
    }

    /// The copy's `:authority`: the suffix goes after the host and before any port
    /// (`api.local:8080` → `api.local-shadow:8080`), as Envoy's own mirroring does.
    pub fn shadow_authority(&self, authority: &str) -> String {
        let suffix = match &self.authority_suffix {
            Some(s) => s.as_str(),
            None => return authority.to_string(),
        };
        // An IPv6 literal keeps its brackets; only a port after the host is split off.
        let host_end = match authority.rfind(':') {
            Some(colon)
                if !authority[colon..].contains(']')
                    && authority[colon + 1..].bytes().all(|b| b.is_ascii_digit()) =>
            {
                colon
            }
            _ => authority.len(),
        };
        format!(
            "{}{}{}",
            &authority[..host_end],
            suffix,
            &authority[host_end..]
        )
    }
}

impl SplitKey {
    /// The key this split would use for the request, if present and non-empty.
    pub fn value<'r, R: RequestInputs + ?Sized>(&self, request: &'r R) -> Option<&'r [u8]> {
        match self {
            SplitKey::Header(input) => request.input(*input).filter(|v| !v.is_empty()),
            SplitKey::Cookie { name, input } => request
                .input(*input)
                .and_then(|header| crate::decide::cookie_value(header, name.as_bytes()))
                .filter(|v| !v.is_empty()),
            SplitKey::Random => None,
        }
    }
}

/// A running hash of a body, up to a byte limit, for `compare: "body"`.
pub struct BodyDigest {
    hasher: fnv::FnvHasher,
    len: usize,
    limit: usize,
}

impl BodyDigest {
    /// A digest that gives up past `limit` bytes.
    pub fn new(limit: usize) -> BodyDigest {
        BodyDigest {
            hasher: fnv::FnvHasher::default(),
            len: 0,
            limit,
        }
    }

    /// Adds the next chunk.
    pub fn update(&mut self, chunk: &[u8]) {
        self.len = self.len.saturating_add(chunk.len());
        if self.len <= self.limit {
            self.hasher.write(chunk);
        }
    }

    /// The hash and length, or `None` when the body was longer than the limit.
    pub fn finish(&self) -> Option<(u64, usize)> {
        if self.len <= self.limit {
            Some((self.hasher.finish(), self.len))
        } else {
            None
        }
    }
}

impl Decoder {
    /// Validates the policy's `mirror` section.
    pub(crate) fn mirror(
        &mut self,
        value: &Value,
        path: &str,
        sample_key: Option<SplitKey>,
    ) -> Option<Mirror> {
        let map = self.object(value, path, MIRROR_FIELDS)?;
        let cluster = self
            .required(map, path, "cluster")
            .and_then(|v| self.string(v, &join(path, "cluster")))
            .and_then(|c| {
                if c.is_empty() {
                    self.error(&join(path, "cluster"), "must not be empty");
                    None
                } else {
                    Some(c.to_string())
                }
            });
        let when = match map.get("when") {
            None => Some(Vec::new()),
            Some(v) => self.conditions(v, &join(path, "when")),
        };
        let percent_ppm = match map.get("percent") {
            None => Some(1_000_000),
            Some(v) => match v.as_f64() {
                Some(p) if (0.0..=100.0).contains(&p) => Some((p * 10_000.0).round() as u32),
                _ => {
                    self.error(
                        &join(path, "percent"),
                        format!("expected a number from 0 to 100, found {}", shown(v)),
                    );
                    None
                }
            },
        };
        let methods = match map.get("methods") {
            None => Some(DEFAULT_METHODS.iter().map(|m| m.to_string()).collect()),
            Some(v) => self.methods(v, &join(path, "methods")),
        };
        let strip_headers = match map.get("strip_headers") {
            None => Some(Vec::new()),
            Some(v) => self.header_list(v, &join(path, "strip_headers")),
        }
        .map(|extra| {
            let mut all: Vec<String> = ALWAYS_STRIPPED.iter().map(|h| h.to_string()).collect();
            all.extend(
                extra
                    .into_iter()
                    .filter(|h| !ALWAYS_STRIPPED.contains(&h.as_str())),
            );
            all
        });
        let marker_header = match map.get("marker_header") {
            None => Some(DEFAULT_MARKER_HEADER.to_string()),
            Some(v) => self
                .header_name(v, &join(path, "marker_header"))
                .and_then(|h| {
                    if h.starts_with(':') {
                        self.error(&join(path, "marker_header"), "must not be a pseudo-header");
                        None
                    } else {
                        Some(h)
                    }
                }),
        };
        let authority_suffix = match map.get("authority_suffix") {
            None => Some(Some("-shadow".to_string())),
            Some(Value::Null) => Some(None),
            Some(v) => self
                .string(v, &join(path, "authority_suffix"))
                .and_then(|s| {
                    if !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                    {
                        Some(Some(s.to_string()))
                    } else {
                        self.error(
                            &join(path, "authority_suffix"),
                            "must be null or a non-empty string of letters, digits, '-' and '.'",
                        );
                        None
                    }
                }),
        };
        let max_body_bytes = self.bounded(map, path, "max_body_bytes", 65_536, 0, MAX_BODY_LIMIT);
        let timeout_ms = self.bounded(map, path, "timeout_ms", 2_000, 1, 300_000);
        let max_in_flight = self.bounded(map, path, "max_in_flight", 100, 1, 100_000);
        let compare = match map.get("compare") {
            None => Some(Compare::Status),
            Some(v) => match v.as_str() {
                Some("off") => Some(Compare::Off),
                Some("status") => Some(Compare::Status),
                Some("body") => Some(Compare::Body),
                _ => {
                    self.error(
                        &join(path, "compare"),
                        "expected \"off\", \"status\" or \"body\"",
                    );
                    None
                }
            },
        };
        let method_input = self.input(":method");
        let marker_input = marker_header.as_deref().map(|h| self.input(h));
        let listed_fingerprints = match (&strip_headers, &marker_header) {
            (Some(strip), Some(marker)) => {
                name_fingerprints(strip.iter().map(String::as_str).chain([marker.as_str()]))
            }
            _ => 0,
        };
        Some(Mirror {
            cluster: cluster?,
            when: when?,
            percent_ppm: percent_ppm?,
            methods: methods?,
            strip_headers: strip_headers?,
            marker_header: marker_header?,
            authority_suffix: authority_suffix?,
            max_body_bytes: max_body_bytes? as usize,
            timeout_ms: timeout_ms? as u32,
            max_in_flight: max_in_flight? as u32,
            compare: compare?,
            method_input,
            marker_input: marker_input?,
            sample_key,
            listed_fingerprints,
        })
    }

    /// An optional integer field within `min..=max`.
    fn bounded(
        &mut self,
        map: &serde_json::Map<String, Value>,
        path: &str,
        field: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        match map.get(field) {
            None => Some(default),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Some(n),
                _ => {
                    self.error(
                        &join(path, field),
                        format!(
                            "expected an integer from {} to {}, found {}",
                            min,
                            max,
                            shown(v)
                        ),
                    );
                    None
                }
            },
        }
    }

    fn methods(&mut self, value: &Value, path: &str) -> Option<Vec<String>> {
        let items = self.list(value, path)?;
        let mut out: Vec<String> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{}[{}]", path, i);
            match self.string(item, &item_path) {
                Some(m) if !m.is_empty() && m.bytes().all(is_token_byte) => {
                    // Methods are case-sensitive on the wire; every registered one is upper-case.
                    let m = m.to_ascii_uppercase();
                    if !out.contains(&m) {
                        out.push(m);
                    }
                }
                Some(m) => {
                    self.error(&item_path, format!("{:?} is not a valid HTTP method", m));
                    ok = false;
                }
                None => ok = false,
            }
        }
        if ok {
            Some(out)
        } else {
            None
        }
    }

    fn header_list(&mut self, value: &Value, path: &str) -> Option<Vec<String>> {
        let items = match value.as_array() {
            Some(items) => items,
            None => {
                self.error(path, format!("expected a list, found {}", kind(value)));
                return None;
            }
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{}[{}]", path, i);
            match self.header_name(item, &item_path) {
                // A copy without `:method`, `:path` or `:scheme` cannot be sent at all.
                Some(h) if h.starts_with(':') => {
                    self.error(&item_path, "must not be a pseudo-header");
                    ok = false;
                }
                Some(h) => out.push(h),
                None => ok = false,
            }
        }
        if ok {
            Some(out)
        } else {
            None
        }
    }

    fn list<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v Vec<Value>> {
        match value.as_array() {
            Some(items) if !items.is_empty() => Some(items),
            Some(_) => {
                self.error(path, "must list at least one value");
                None
            }
            None => {
                self.error(path, format!("expected a list, found {}", kind(value)));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(suffix: Option<&str>) -> Mirror {
        Mirror {
            cluster: "shadow".into(),
            when: Vec::new(),
            percent_ppm: 1_000_000,
            methods: DEFAULT_METHODS.iter().map(|m| m.to_string()).collect(),
            strip_headers: vec!["x-session-token".into()],
            marker_header: DEFAULT_MARKER_HEADER.into(),
            authority_suffix: suffix.map(str::to_string),
            max_body_bytes: 16,
            timeout_ms: 100,
            max_in_flight: 1,
            compare: Compare::Status,
            method_input: 0,
            marker_input: 1,
            sample_key: None,
            listed_fingerprints: name_fingerprints(["x-session-token", DEFAULT_MARKER_HEADER]),
        }
    }

    #[test]
    fn authority_suffix_goes_before_the_port() {
        let m = mirror(Some("-shadow"));
        assert_eq!(m.shadow_authority("api.local"), "api.local-shadow");
        assert_eq!(
            m.shadow_authority("api.local:8080"),
            "api.local-shadow:8080"
        );
        assert_eq!(m.shadow_authority("[::1]:8080"), "[::1]-shadow:8080");
        assert_eq!(m.shadow_authority("[::1]"), "[::1]-shadow");
        assert_eq!(
            mirror(None).shadow_authority("api.local:8080"),
            "api.local:8080"
        );
    }

    #[test]
    fn every_fixed_header_is_found_through_the_fingerprints_in_any_case() {
        for name in ALWAYS_STRIPPED
            .iter()
            .chain(&CONNECTION_HEADERS)
            .chain(&[":authority"])
        {
            let m = mirror(None);
            assert!(!m.copies_header(name), "{name}");
            assert!(!m.copies_header(&name.to_ascii_uppercase()), "{name}");
            // Same length, another name: copied.
            let other: String = name.chars().rev().collect();
            if other != *name {
                assert!(m.copies_header(&other), "{other}");
            }
        }
    }

    #[test]
    fn credentials_connection_and_listed_headers_are_not_copied() {
        let m = mirror(Some("-shadow"));
        for name in [
            "Authorization",
            "proxy-authorization",
            "cookie",
            "X-Api-Key",
            "x-session-token",
            "x-meshcanary-shadow",
            "connection",
            "Transfer-Encoding",
            "content-length",
            "x-envoy-expected-rq-timeout-ms",
            ":authority",
        ] {
            assert!(!m.copies_header(name), "{name} must not be copied");
        }
        for name in [
            ":method",
            ":path",
            ":scheme",
            "accept",
            "x-request-id",
            "user-agent",
            "x-env",
        ] {
            assert!(m.copies_header(name), "{name} must be copied");
        }
    }

    #[test]
    fn marked_requests_are_never_copied_and_methods_are_checked() {
        let m = mirror(None);
        let get: Vec<Option<&[u8]>> = vec![Some(b"GET"), None];
        let marked: Vec<Option<&[u8]>> = vec![Some(b"GET"), Some(b"token")];
        let forged: Vec<Option<&[u8]>> = vec![Some(b"GET"), Some(b"1")];
        let post: Vec<Option<&[u8]>> = vec![Some(b"POST"), None];
        let choose = |r: &Vec<Option<&[u8]>>| m.choose(r, m.marker(r, b"token"), || 0);
        assert_eq!(m.marker(&get, b"token"), Marker::Absent);
        assert_eq!(choose(&get), MirrorChoice::Send);
        assert_eq!(m.marker(&marked, b"token"), Marker::Genuine);
        assert_eq!(choose(&marked), MirrorChoice::Skip(SkipReason::Marked));
        assert_eq!(m.marker(&forged, b"token"), Marker::Forged);
        assert_eq!(
            choose(&forged),
            MirrorChoice::Send,
            "a forged marker is live"
        );
        assert_eq!(m.marker(&marked, b""), Marker::Forged, "no token, no copy");
        assert_eq!(choose(&post), MirrorChoice::Skip(SkipReason::Method));
    }

    #[test]
    fn percent_sampling_draws_only_when_needed() {
        let mut m = mirror(None);
        let get: Vec<Option<&[u8]>> = vec![Some(b"GET"), None];
        m.percent_ppm = 0;
        assert_eq!(
            m.choose(&get, Marker::Absent, || panic!("no draw at 0 %")),
            MirrorChoice::Skip(SkipReason::SampledOut)
        );
        m.percent_ppm = 500_000;
        assert_eq!(m.choose(&get, Marker::Absent, || 0), MirrorChoice::Send);
        assert_eq!(
            m.choose(&get, Marker::Absent, || u64::MAX),
            MirrorChoice::Skip(SkipReason::SampledOut)
        );
    }

    #[test]
    fn body_digest_gives_up_past_the_limit() {
        let mut a = BodyDigest::new(8);
        a.update(b"abcd");
        a.update(b"efgh");
        let mut b = BodyDigest::new(8);
        b.update(b"abcdefgh");
        assert_eq!(a.finish(), b.finish());
        a.update(b"i");
        assert_eq!(a.finish(), None);
    }
}
