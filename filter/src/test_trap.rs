//! A deliberate VM failure, compiled only with the `test-trap` feature: the failure-policy
//! tests need a module built from this repository that dies the way a panic in the
//! proxy-wasm SDK kills it (`panic = "abort"` makes every panic a Wasm trap), on a request
//! they choose, so they can watch what Envoy does with the requests after it.

use crate::host;

/// The request header that makes the module trap.
const TRAP_HEADER: &str = "x-meshcanary-test-trap";

/// Traps when the current request carries [`TRAP_HEADER`].
pub fn on_request() {
    if let Ok(Some(_)) = host::request_header(TRAP_HEADER) {
        log::error!("meshcanary: test-trap build: trapping on a marked request");
        trap();
    }
}

#[cfg(target_arch = "wasm32")]
fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

#[cfg(not(target_arch = "wasm32"))]
fn trap() -> ! {
    std::process::abort()
}
