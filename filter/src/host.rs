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

/// Replaces every value of a request header with `value`.
pub fn set_request_header(name: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value))
}

/// Value of a response header, as bytes.
pub fn response_header(name: &str) -> Result<Option<Vec<u8>>, Status> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
}

/// Asks Envoy (≥ 1.33) to recompute the route after a header change. Older Envoys and
/// ABI 0.2.1 modules clear the route cache on header changes anyway, so a missing
/// function is not an error.
pub fn clear_route_cache() {
    let _ = hostcalls::call_foreign_function("clear_route_cache", None);
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

/// Adds one to a counter.
pub fn increment(metric: u32) {
    let _ = hostcalls::increment_metric(metric, 1);
}

/// Records a value into a histogram.
pub fn record(metric: u32, value: u64) {
    let _ = hostcalls::record_metric(metric, value);
}

/// Every request header, names as text and values as bytes.
pub fn request_headers() -> Result<Vec<(String, Vec<u8>)>, Status> {
    hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
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
