//! An empty proxy-wasm HTTP filter, built only for `make bench`: it gives every stream a
//! context and lets every callback return at once, so what it costs is the unavoidable
//! price of running any Rust proxy-wasm filter (V8 calls per callback, context creation)
//! with nothing of meshcanary's own. Built with the same toolchain and release profile
//! as the real filter (`scripts/build-wasm.sh bench-empty`).
#![forbid(unsafe_code)]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(EmptyRoot) });
}}

/// Accepts any configuration and hands out empty stream contexts.
struct EmptyRoot;

impl Context for EmptyRoot {}

impl RootContext for EmptyRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EmptyStream))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Every callback keeps its default: `Action::Continue`, no host call.
struct EmptyStream;

impl Context for EmptyStream {}

impl HttpContext for EmptyStream {}
