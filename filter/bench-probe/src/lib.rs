//! A probe for `make bench-host-calls`: a proxy-wasm filter that, on every request, makes
//! one kind of host call a fixed number of times and does nothing else. Measured against
//! the same probe making no call, it gives the price of each call the real filter makes
//! (a header read, the whole header map, `:status`, a header write, a counter, a
//! histogram value, the clock) with the noise of a shared machine divided by the count.
//!
//! Its plugin configuration is `<call> <count>`, for example `request_header_present 20`,
//! or several of those separated by commas: `make bench`'s row 2c makes every host call
//! the real filter makes on a request, and nothing else (see [`parse_calls`]). An unknown
//! call or a count outside 1–1000 refuses the configuration, so Envoy does not start
//! with it. Built with the filter's toolchain and
//! release profile (`scripts/build-wasm.sh bench-probe`).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot::default()) });
}}

/// A header every `make bench` request carries (wrk's `User-Agent`).
const PRESENT_HEADER: &str = "user-agent";
/// A header no request carries.
const ABSENT_HEADER: &str = "x-meshcanary-probe-absent";
/// The header the real filter writes.
const WRITTEN_HEADER: &str = "x-meshcanary-variant";

/// The host call a probe makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// No call: the baseline every other call is measured against.
    None,
    /// Read a request header that is present (the host calls back to allocate the copy).
    RequestHeaderPresent,
    /// Read a request header that is absent.
    RequestHeaderAbsent,
    /// Read every request header in one call (the serialized map).
    RequestHeadersWholeMap,
    /// Replace a request header (this also clears Envoy's route cache).
    SetRequestHeader,
    /// Read the response's `:status`.
    ResponseStatus,
    /// Add one to a counter.
    CounterIncrement,
    /// Record a histogram value.
    HistogramRecord,
    /// Read the host clock.
    Clock,
}

impl Call {
    /// Every call, in the order `make bench-host-calls` reports them.
    pub const ALL: [(&'static str, Call); 9] = [
        ("none", Call::None),
        ("request_header_present", Call::RequestHeaderPresent),
        ("request_header_absent", Call::RequestHeaderAbsent),
        ("request_headers_whole_map", Call::RequestHeadersWholeMap),
        ("set_request_header", Call::SetRequestHeader),
        ("response_status", Call::ResponseStatus),
        ("counter_increment", Call::CounterIncrement),
        ("histogram_record", Call::HistogramRecord),
        ("clock", Call::Clock),
    ];

    /// `"<call> <count>"` → the call and how often to make it per request.
    fn parse(config: &str) -> Result<(Call, u32), String> {
        let mut words = config.split_whitespace();
        let (name, count) = match (words.next(), words.next(), words.next()) {
            (Some(name), Some(count), None) => (name, count),
            _ => return Err(format!("{config:?}: expected \"<call> <count>\"")),
        };
        let call = Call::ALL
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, call)| *call)
            .ok_or_else(|| format!("{name:?}: unknown call"))?;
        match count.parse::<u32>() {
            Ok(count) if (1..=1000).contains(&count) => Ok((call, count)),
            _ => Err(format!("{count:?}: the count must be 1–1000")),
        }
    }
}

/// `"<call> <count>[, <call> <count> …]"` → each call and how often to make it per
/// request, in order.
pub fn parse_calls(config: &str) -> Result<Vec<(Call, u32)>, String> {
    config.split(',').map(Call::parse).collect()
}

#[derive(Default)]
struct ProbeRoot {
    probe: Option<Rc<Probe>>,
}

struct Probe {
    /// Each call and its count; `:status` is read on response headers (the only phase
    /// it exists in), every other call on request headers.
    calls: Vec<(Call, u32)>,
    counter: u32,
    histogram: u32,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let parsed = String::from_utf8(config)
            .map_err(|_| "the configuration is not UTF-8".to_string())
            .and_then(|text| parse_calls(&text));
        match parsed {
            Ok(calls) => {
                let define = |kind, name| hostcalls::define_metric(kind, name).unwrap_or(0);
                self.probe = Some(Rc::new(Probe {
                    calls,
                    counter: define(MetricType::Counter, "meshcanary_probe.counter"),
                    histogram: define(MetricType::Histogram, "meshcanary_probe.histogram"),
                }));
                true
            }
            Err(e) => {
                log::error!("meshcanary probe: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ProbeStream {
            probe: self.probe.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ProbeStream {
    probe: Option<Rc<Probe>>,
}

impl Context for ProbeStream {}

impl HttpContext for ProbeStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(probe) = &self.probe {
            probe.make_calls(|call| call != Call::ResponseStatus);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(probe) = &self.probe {
            probe.make_calls(|call| call == Call::ResponseStatus);
        }
        Action::Continue
    }
}

impl Probe {
    /// Makes each configured call that belongs to this phase, `count` times.
    fn make_calls(&self, in_phase: impl Fn(Call) -> bool) {
        for &(call, count) in &self.calls {
            if in_phase(call) {
                for _ in 0..count {
                    self.make_call(call);
                }
            }
        }
    }

    /// One call; results are dropped (a host call cannot be optimized away).
    fn make_call(&self, call: Call) {
        let request = MapType::HttpRequestHeaders;
        match call {
            Call::None => {}
            Call::RequestHeaderPresent => {
                let _ = hostcalls::get_map_value_bytes(request, PRESENT_HEADER);
            }
            Call::RequestHeaderAbsent => {
                let _ = hostcalls::get_map_value_bytes(request, ABSENT_HEADER);
            }
            Call::RequestHeadersWholeMap => whole_map(),
            Call::SetRequestHeader => {
                let _ = hostcalls::set_map_value_bytes(request, WRITTEN_HEADER, Some(b"stable"));
            }
            Call::ResponseStatus => {
                let _ = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status");
            }
            Call::CounterIncrement => {
                let _ = hostcalls::increment_metric(self.counter, 1);
            }
            Call::HistogramRecord => {
                let _ = hostcalls::record_metric(self.histogram, 1);
            }
            Call::Clock => {
                let _ = hostcalls::get_current_time();
            }
        }
    }
}

/// Reads the serialized request header map the way the filter does (`host.rs`): one
/// call, no parsing into strings, the buffer freed at once.
fn whole_map() {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as in the filter's `host::request_headers`: the host hands over a buffer it
    // allocated through the SDK's `proxy_on_memory_allocate` (a `Vec<u8>` of capacity
    // `size`, forgotten), or null; `Vec::from_raw_parts` takes it back and frees it.
    unsafe {
        if proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size) == 0
            && !data.is_null()
        {
            drop(Vec::from_raw_parts(data, size, size));
        }
    }
}

extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_call_and_refuses_what_it_does_not_know() {
        for (name, call) in Call::ALL {
            assert_eq!(Call::parse(&format!("{name} 20")), Ok((call, 20)));
        }
        assert!(Call::parse("clock").unwrap_err().contains("expected"));
        assert!(Call::parse("clock 0").unwrap_err().contains("1–1000"));
        assert!(Call::parse("clock 1001").unwrap_err().contains("1–1000"));
        assert!(Call::parse("teleport 3")
            .unwrap_err()
            .contains("unknown call"));
        assert!(Call::parse("clock 2 3").unwrap_err().contains("expected"));
    }

    #[test]
    fn a_list_of_calls_is_parsed_in_order_and_any_bad_item_refuses_it() {
        assert_eq!(
            parse_calls("request_headers_whole_map 1, response_status 1,clock 2"),
            Ok(vec![
                (Call::RequestHeadersWholeMap, 1),
                (Call::ResponseStatus, 1),
                (Call::Clock, 2)
            ])
        );
        assert_eq!(parse_calls("clock 20"), Ok(vec![(Call::Clock, 20)]));
        assert!(parse_calls("clock 2, teleport 1")
            .unwrap_err()
            .contains("unknown call"));
        assert!(parse_calls("clock 2,").unwrap_err().contains("expected"));
    }
}
