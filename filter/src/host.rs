//! The only module that calls the proxy-wasm host. Every call returns an `Option` or a
//! `Result` and never panics on a host status the SDK reports; callers count failures.
//!
//! Calls are only made in the phases where Envoy allows them (request headers are read
//! in `on_http_request_headers`, response headers in `on_http_response_headers`): the
//! SDK's hostcalls panic on statuses they do not expect, and a panic is a wasm trap
//! that kills the worker's VM.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::time::Duration;

/// The decoder of the host's serialized header maps lives in the pure core, where it is
/// tested natively and fuzzed.
pub use meshcanary_policy::headers::HeaderMap;

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
        // SAFETY: see above.
        ffi::STATUS_OK => Some(HeaderMap::from_bytes(unsafe {
            Vec::from_raw_parts(data, size, size)
        })),
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
        pub fn proxy_dequeue_shared_queue(
            queue_id: u32,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
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

/// Replaces every value of a request header with `value`.
pub fn set_request_header(name: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value))
}

/// Value of a response header, as bytes.
pub fn response_header(name: &str) -> Result<Option<Vec<u8>>, Status> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
}

/// Host clock in nanoseconds since the Unix epoch. Read through the import itself: the
/// SDK's `get_current_time` turns it into a `SystemTime`, and back to nanoseconds here
/// cost two 128-bit conversions a read, twice a request.
pub fn now_ns() -> Option<u64> {
    let mut now: u64 = 0;
    // SAFETY: the host writes one u64 at the address given.
    let status = unsafe { ffi::proxy_get_current_time_nanoseconds(&mut now) };
    (status == ffi::STATUS_OK).then_some(now)
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

/// Takes one message off a shared queue, dropping its content; false when the queue is
/// empty (or gone). Called directly: the SDK's `dequeue_shared_queue` returns `None` for
/// an empty message as for an empty queue, and an empty message is the cheap one (the
/// host calls back into the module to allocate a copy of any other).
pub fn dequeue(queue: u32) -> bool {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes one pointer and one size into the two locals.
    let status = unsafe { ffi::proxy_dequeue_shared_queue(queue, &mut data, &mut size) };
    if !data.is_null() {
        // SAFETY: a non-null pointer is `size` bytes the host allocated through this
        // module's `proxy_on_memory_allocate` (a `Vec` of that capacity): freed as one.
        drop(unsafe { Vec::from_raw_parts(data, size, size) });
    }
    status == ffi::STATUS_OK
}
