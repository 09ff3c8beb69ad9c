//! The only module that calls the proxy-wasm host. Every call returns an `Option` or a
//! `Result` and never panics on a host status the SDK reports; callers count failures.
//!
//! Calls are only made in the phases where Envoy allows them (request headers are read
//! in `on_http_request_headers`, response headers in `on_http_response_headers`): the
//! SDK's hostcalls panic on statuses they do not expect, and a panic is a wasm trap
//! that kills the worker's VM.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::time::{Duration, UNIX_EPOCH};

/// Value of a request header, as bytes (values need not be UTF-8).
pub fn request_header(name: &str) -> Result<Option<Vec<u8>>, Status> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
}

/// Every request header, read in one host call (names as Envoy holds them: lower-case,
/// pseudo-headers included; values need not be UTF-8).
///
/// One call instead of one per header the filter reads: each host call that returns data
/// also makes Envoy call back into the module to allocate it, and that pair of crossings
/// is most of what a header read costs. The SDK's `get_map_bytes` also reads the map in
/// one call, but allocates two strings per header and panics on a status it does not
/// expect. `None` when the host refused.
pub fn request_headers() -> Option<HeaderMap> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to `size` bytes it allocated through the SDK's
    // `proxy_on_memory_allocate` (a `Vec<u8>` of capacity `size`, forgotten), or null.
    // Ownership passes to us, and `Vec::from_raw_parts` takes it back exactly as the
    // SDK's own `get_map_bytes` does.
    let status = unsafe {
        ffi::proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size)
    };
    match status {
        ffi::STATUS_OK if data.is_null() || size == 0 => Some(HeaderMap::default()),
        ffi::STATUS_OK => Some(HeaderMap {
            // SAFETY: see above.
            bytes: unsafe { Vec::from_raw_parts(data, size, size) },
        }),
        _ => None,
    }
}

/// The imports this module declares itself, where the SDK's `hostcalls` either has no
/// way to do it (hand out a serialized map unparsed) or panics on a status the host may
/// return (header removal, shared data). Same ABI functions, same import module (`env`).
mod ffi {
    /// `Status::Ok` of the ABI (the SDK's enum is not FFI-safe across crates).
    pub const STATUS_OK: u32 = 0;
    /// `Status::NotFound` of the ABI.
    pub const STATUS_NOT_FOUND: u32 = 1;

    extern "C" {
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
        ) -> u32;
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        pub fn proxy_done() -> u32;
        pub fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
    }
}

/// Tells the host that the current root context, which returned `false` from `on_done`,
/// has finished its work and may be deleted; false when the host refused.
pub fn done() -> bool {
    // SAFETY: no arguments; the host acts on the current context.
    unsafe { ffi::proxy_done() == ffi::STATUS_OK }
}

/// Removes a request header (every value of it); false when the host refused.
pub fn remove_request_header(name: &str) -> bool {
    // SAFETY: the host only reads `name.len()` bytes at `name.as_ptr()`.
    let status = unsafe {
        ffi::proxy_remove_header_map_value(
            MapType::HttpRequestHeaders as u32,
            name.as_ptr(),
            name.len(),
        )
    };
    status == ffi::STATUS_OK
}

/// A value of the proxy's shared data — one store for every VM with this `vm_id` in the
/// process, i.e. every worker — and its compare-and-swap version. `Some((None, 0))` when the
/// key is not there; `None` when the host refused.
pub fn shared_data(key: &str) -> Option<(Option<Vec<u8>>, u32)> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: as for `proxy_get_header_map_pairs` in `request_headers`: the host hands us
    // a buffer it allocated through the SDK's `proxy_on_memory_allocate`, or null.
    let status = unsafe {
        ffi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
    };
    match status {
        ffi::STATUS_OK if data.is_null() || size == 0 => Some((Some(Vec::new()), cas)),
        // SAFETY: see above.
        ffi::STATUS_OK => Some((Some(unsafe { Vec::from_raw_parts(data, size, size) }), cas)),
        ffi::STATUS_NOT_FOUND => Some((None, 0)),
        _ => None,
    }
}

/// Writes shared data if its version is still `cas` (0 writes whatever is there); false
/// when another VM wrote first (or the host refused).
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> bool {
    // SAFETY: the host only reads the two buffers, for their lengths.
    let status = unsafe {
        ffi::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    };
    status == ffi::STATUS_OK
}

/// A header map as the proxy-wasm ABI serializes it, read in place:
/// `count: u32`, then `count` × (`name_len: u32`, `value_len: u32`), then each name and
/// value followed by a NUL byte (all integers little-endian).
#[derive(Default)]
pub struct HeaderMap {
    bytes: Vec<u8>,
}

impl HeaderMap {
    /// A map over already serialized bytes (tests, and anything else that has them).
    #[cfg(test)]
    pub fn from_bytes(bytes: Vec<u8>) -> HeaderMap {
        HeaderMap { bytes }
    }

    /// The pairs in Envoy's order. Malformed data (which Envoy does not produce) ends the
    /// iteration early instead of panicking.
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
    let raw = bytes.get(at..at.checked_add(4)?)?;
    let mut word = [0u8; 4];
    word.copy_from_slice(raw);
    usize::try_from(u32::from_le_bytes(word)).ok()
}

/// Replaces every value of a request header with `value`.
pub fn set_request_header(name: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value))
}

/// Value of a response header, as bytes.
pub fn response_header(name: &str) -> Result<Option<Vec<u8>>, Status> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
}

/// Host clock in nanoseconds since the Unix epoch.
pub fn now_ns() -> Option<u64> {
    let time = hostcalls::get_current_time().ok()?;
    let since = time.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_nanos()).ok()
}

/// Plugin configuration bytes (the policy JSON).
pub fn plugin_configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(
        proxy_wasm::types::BufferType::PluginConfiguration,
        0,
        usize::MAX,
    )
    .ok()
    .flatten()
}

/// Defines (or finds) a metric; Envoy shows it as `wasmcustom.<name>`.
pub fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

/// Adds `by` to a counter.
pub fn increment_by(metric: u32, by: u64) {
    let by = i64::try_from(by).unwrap_or(i64::MAX);
    let _ = hostcalls::increment_metric(metric, by);
}

/// Asks for `on_tick` on this root context every `period`.
pub fn set_tick_period(period: std::time::Duration) {
    let _ = hostcalls::set_tick_period(period);
}

/// Records a value into a histogram.
pub fn record(metric: u32, value: u64) {
    let _ = hostcalls::record_metric(metric, value);
}

/// Every request trailer.
pub fn request_trailers() -> Result<Vec<(String, Vec<u8>)>, Status> {
    hostcalls::get_map_bytes(MapType::HttpRequestTrailers)
}

/// The request body chunk Envoy is passing through now (`size` bytes).
pub fn request_body_chunk(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
        .ok()
        .flatten()
}

/// The response body chunk Envoy is passing through now (`size` bytes).
pub fn response_body_chunk(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
        .ok()
        .flatten()
}

/// A header of the response to an HTTP call (in `on_http_call_response`).
pub fn call_response_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name)
        .ok()
        .flatten()
}

/// The body of the response to an HTTP call.
pub fn call_response_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
        .ok()
        .flatten()
}

/// Sends an HTTP request to `cluster`; the answer arrives in `on_http_call_response` of
/// the context that was active (the root, when called from `on_queue_ready`).
pub fn dispatch(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: Option<&[u8]>,
    trailers: Vec<(&str, &str)>,
    timeout: Duration,
) -> Result<u32, Status> {
    hostcalls::dispatch_http_call(cluster, headers, body, trailers, timeout)
}

/// Registers a shared queue owned by the current root context.
pub fn register_queue(name: &str) -> Option<u32> {
    hostcalls::register_shared_queue(name).ok()
}

/// Puts a message on a shared queue; Envoy then calls the owner's `on_queue_ready`.
pub fn enqueue(queue: u32, message: &[u8]) -> bool {
    hostcalls::enqueue_shared_queue(queue, Some(message)).is_ok()
}

/// Takes one message off a shared queue; false when it is empty (or gone).
pub fn dequeue(queue: u32) -> bool {
    matches!(hostcalls::dequeue_shared_queue(queue), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serializes pairs the way the host does.
    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (n, v) in pairs {
            out.extend_from_slice(&(n.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (n, v) in pairs {
            out.extend_from_slice(n);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
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
