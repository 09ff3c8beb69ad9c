//! Stub proxy-wasm host functions (ABI 0.2.1, as the SDK 0.2.2 imports them) and the WASI
//! calls Rust's standard library makes, answering as Envoy does and counting every call.
//!
//! Data the host hands to the module travels as Envoy's does: the host calls the module's
//! `proxy_on_memory_allocate`, copies the bytes there and writes the pointer and size to
//! the return slots. That call back into the module is counted too (as
//! [`ALLOCATE_CALLBACK`]), and its fuel is part of the request's: it is work the module
//! does for every value it reads.

use std::collections::{BTreeMap, HashMap};

use meshcanary_policy::headers;

use crate::profile::{self, Profile};
use wasmi::{Caller, Error, Extern, Linker};

/// Name under which the host's calls back into `proxy_on_memory_allocate` are counted.
pub const ALLOCATE_CALLBACK: &str = "(callback) proxy_on_memory_allocate";

/// proxy-wasm status codes (the ABI's `WasmResult`).
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
/// What Envoy answers a dequeue from an empty queue.
const EMPTY: i32 = 7;

/// The ABI's map types this harness serves.
const REQUEST_HEADERS: i32 = 0;
const RESPONSE_HEADERS: i32 = 2;
const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
/// The ABI's buffer type of the plugin configuration.
const PLUGIN_CONFIGURATION: i32 = 7;

/// One metric the module defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// The name the module gave it.
    pub name: String,
    /// The ABI's metric type: 0 counter, 1 gauge, 2 histogram.
    pub kind: i32,
    /// A counter's or gauge's value.
    pub value: i64,
    /// Values recorded into a histogram.
    pub recorded: u64,
}

/// Everything the stub host knows: the current stream's maps, the configuration, the
/// metrics the module defined, and how often each host function was called.
#[derive(Debug, Default)]
pub struct HostState {
    /// The plugin configuration (`proxy_get_buffer_bytes` of type 7).
    pub plugin_configuration: Vec<u8>,
    /// Request headers of the current stream, in order (names lower-case, pseudo-headers first).
    pub request_headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Response headers of the current stream.
    pub response_headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Calls per import name (and [`ALLOCATE_CALLBACK`]).
    pub calls: BTreeMap<String, u64>,
    /// Metrics by id (the id is the index).
    pub metrics: Vec<Metric>,
    /// Shared data by key: value and version.
    pub shared_data: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    /// Shared queues by id (the id is the index): their names.
    pub queues: Vec<Vec<u8>>,
    /// Log lines at warning level or above, for diagnosis (`proxy_log`).
    pub warnings: Vec<String>,
    /// The fake clock: advances 50 µs per read, so latencies are non-zero and fixed.
    pub clock_ns: u64,
    /// State of the deterministic generator behind WASI `random_get`.
    pub random_state: u64,
    /// Tokens handed out by `proxy_http_call`.
    pub http_calls: u32,
    /// Messages on the shared queues, in order: queue id and message.
    pub queued: Vec<(u32, Vec<u8>)>,
    /// The `on_queue_ready` callbacks Envoy has posted and not yet delivered: one per
    /// enqueue, whatever the queue holds when it runs (as Envoy does).
    pub posted_wakeups: Vec<u32>,
    /// HTTP calls sent and not yet answered, by token.
    pub calls_in_flight: Vec<u32>,
    /// Headers of the HTTP call response being delivered.
    pub call_response_headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Fuel per function, when the module was instrumented ([`crate::profile`]).
    pub profile: Profile,
}

impl HostState {
    /// A host with this plugin configuration and a clock at a fixed instant.
    pub fn new(plugin_configuration: Vec<u8>) -> HostState {
        HostState {
            plugin_configuration,
            clock_ns: 1_800_000_000_000_000_000,
            random_state: 0x6d65_7368_6361_6e61,
            ..HostState::default()
        }
    }

    fn count(&mut self, name: &str) {
        *self.calls.entry(name.to_string()).or_insert(0) += 1;
    }

    fn map(&mut self, map_type: i32) -> Option<&mut Vec<(Vec<u8>, Vec<u8>)>> {
        match map_type {
            REQUEST_HEADERS => Some(&mut self.request_headers),
            RESPONSE_HEADERS => Some(&mut self.response_headers),
            HTTP_CALL_RESPONSE_HEADERS => Some(&mut self.call_response_headers),
            _ => None,
        }
    }

    /// The first value of header `name` in the current request, if any.
    pub fn request_header(&self, name: &[u8]) -> Option<&[u8]> {
        self.request_headers
            .iter()
            .find(|(n, _)| n.as_slice() == name)
            .map(|(_, v)| v.as_slice())
    }

    fn next_random(&mut self) -> u64 {
        self.random_state = self.random_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.random_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

type Ctx<'a> = Caller<'a, HostState>;

fn memory(caller: &Ctx<'_>) -> Result<wasmi::Memory, Error> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| Error::new("the module exports no memory"))
}

fn read(caller: &Ctx<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, Error> {
    let mut buffer = vec![0; len as u32 as usize];
    memory(caller)?
        .read(caller, ptr as u32 as usize, &mut buffer)
        .map_err(|e| Error::new(format!("reading module memory: {e}")))?;
    Ok(buffer)
}

fn write(caller: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> Result<(), Error> {
    memory(caller)?
        .write(&mut *caller, ptr as u32 as usize, bytes)
        .map_err(|e| Error::new(format!("writing module memory: {e}")))
}

fn write_u32(caller: &mut Ctx<'_>, ptr: i32, value: u32) -> Result<(), Error> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands `bytes` to the module as Envoy does: allocated by the module, pointer and size
/// written to the return slots.
fn give(caller: &mut Ctx<'_>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> Result<(), Error> {
    let allocate = caller
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .ok_or_else(|| Error::new("the module exports no proxy_on_memory_allocate"))?
        .typed::<i32, i32>(&*caller)?;
    caller.data_mut().count(ALLOCATE_CALLBACK);
    let len = i32::try_from(bytes.len()).map_err(|_| Error::new("value too large"))?;
    let ptr = allocate.call(&mut *caller, len)?;
    write(caller, ptr, bytes)?;
    write_u32(caller, ret_ptr, ptr as u32)?;
    write_u32(caller, ret_size, len as u32)
}

/// Defines every stub in `linker`: the proxy-wasm ABI under `env`, WASI under
/// `wasi_snapshot_preview1`.
pub fn define(linker: &mut Linker<HostState>) -> Result<(), Error> {
    define_proxy(linker)?;
    define_wasi(linker)?;
    define_profile(linker)?;
    Ok(())
}

/// The two calls an instrumented module makes ([`crate::profile::instrument`]); a
/// module that was not instrumented never imports them.
fn define_profile(linker: &mut Linker<HostState>) -> Result<(), Error> {
    // What the host does on each: charge fuel to the function entered or left.
    type Record = fn(&mut Profile, u32, u64);
    let calls: [(&str, Record); 2] = [("enter", Profile::enter), ("exit", Profile::exit)];
    for (name, record) in calls {
        linker.func_wrap(
            profile::MODULE,
            name,
            move |mut c: Ctx<'_>, function: i32| -> Result<(), Error> {
                let fuel = c.get_fuel()?;
                record(&mut c.data_mut().profile, function as u32, fuel);
                Ok(())
            },
        )?;
    }
    Ok(())
}

fn define_proxy(linker: &mut Linker<HostState>) -> Result<(), Error> {
    const ENV: &str = "env";
    linker.func_wrap(
        ENV,
        "proxy_log",
        |mut c: Ctx<'_>, level: i32, ptr: i32, size: i32| -> Result<i32, Error> {
            c.data_mut().count("proxy_log");
            if level >= 3 {
                let message = String::from_utf8_lossy(&read(&c, ptr, size)?).into_owned();
                c.data_mut().warnings.push(message);
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_log_level",
        |mut c: Ctx<'_>, ret: i32| -> Result<i32, Error> {
            c.data_mut().count("proxy_get_log_level");
            // Info, Envoy's default.
            write_u32(&mut c, ret, 2)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: Ctx<'_>, ret: i32| -> Result<i32, Error> {
            let state = c.data_mut();
            state.count("proxy_get_current_time_nanoseconds");
            state.clock_ns += 50_000;
            let now = state.clock_ns;
            write(&mut c, ret, &now.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |mut c: Ctx<'_>, _period: i32| -> i32 {
            c.data_mut().count("proxy_set_tick_period_milliseconds");
            OK
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Ctx<'_>,
         buffer: i32,
         start: i32,
         max: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> Result<i32, Error> {
            c.data_mut().count("proxy_get_buffer_bytes");
            if buffer != PLUGIN_CONFIGURATION {
                return Ok(NOT_FOUND);
            }
            let all = &c.data().plugin_configuration;
            let start = (start as u32 as usize).min(all.len());
            let end = start.saturating_add(max as u32 as usize).min(all.len());
            let bytes = all[start..end].to_vec();
            give(&mut c, &bytes, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, map_type: i32, ret_ptr: i32, ret_size: i32| -> Result<i32, Error> {
            c.data_mut().count("proxy_get_header_map_pairs");
            let Some(map) = c.data_mut().map(map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            let bytes = headers::encode(map).ok_or_else(|| Error::new("map too large"))?;
            give(&mut c, &bytes, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>,
         map_type: i32,
         key_ptr: i32,
         key_size: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> Result<i32, Error> {
            c.data_mut().count("proxy_get_header_map_value");
            let key = read(&c, key_ptr, key_size)?;
            let Some(map) = c.data_mut().map(map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(value) = map.iter().find(|(n, _)| *n == key).map(|(_, v)| v.clone()) else {
                return Ok(NOT_FOUND);
            };
            give(&mut c, &value, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    for (name, replace) in [
        ("proxy_replace_header_map_value", true),
        ("proxy_add_header_map_value", false),
    ] {
        linker.func_wrap(
            ENV,
            name,
            move |mut c: Ctx<'_>,
                  map_type: i32,
                  key_ptr: i32,
                  key_size: i32,
                  value_ptr: i32,
                  value_size: i32|
                  -> Result<i32, Error> {
                c.data_mut().count(name);
                let key = read(&c, key_ptr, key_size)?;
                let value = read(&c, value_ptr, value_size)?;
                let Some(map) = c.data_mut().map(map_type) else {
                    return Ok(BAD_ARGUMENT);
                };
                if replace {
                    map.retain(|(n, _)| *n != key);
                }
                map.push((key, value));
                Ok(OK)
            },
        )?;
    }
    linker.func_wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: Ctx<'_>, map_type: i32, key_ptr: i32, key_size: i32| -> Result<i32, Error> {
            c.data_mut().count("proxy_remove_header_map_value");
            let key = read(&c, key_ptr, key_size)?;
            let Some(map) = c.data_mut().map(map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            map.retain(|(n, _)| *n != key);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_property",
        |mut c: Ctx<'_>, _p: i32, _s: i32, _rp: i32, _rs: i32| -> i32 {
            c.data_mut().count("proxy_get_property");
            NOT_FOUND
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_define_metric",
        |mut c: Ctx<'_>,
         kind: i32,
         name_ptr: i32,
         name_size: i32,
         ret: i32|
         -> Result<i32, Error> {
            c.data_mut().count("proxy_define_metric");
            let name = String::from_utf8_lossy(&read(&c, name_ptr, name_size)?).into_owned();
            let metrics = &mut c.data_mut().metrics;
            // Envoy hands out a new id for every definition, even of a known name.
            metrics.push(Metric {
                name,
                kind,
                value: 0,
                recorded: 0,
            });
            let id = metrics.len() as u32 - 1;
            write_u32(&mut c, ret, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_increment_metric",
        |mut c: Ctx<'_>, id: i32, by: i64| -> i32 {
            c.data_mut().count("proxy_increment_metric");
            match c.data_mut().metrics.get_mut(id as u32 as usize) {
                Some(metric) => {
                    metric.value += by;
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_record_metric",
        |mut c: Ctx<'_>, id: i32, value: i64| -> i32 {
            c.data_mut().count("proxy_record_metric");
            match c.data_mut().metrics.get_mut(id as u32 as usize) {
                Some(metric) if metric.kind == 2 => {
                    metric.recorded += 1;
                    OK
                }
                Some(metric) => {
                    metric.value = value;
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_metric",
        |mut c: Ctx<'_>, id: i32, ret: i32| -> Result<i32, Error> {
            c.data_mut().count("proxy_get_metric");
            let Some(value) = c.data().metrics.get(id as u32 as usize).map(|m| m.value) else {
                return Ok(NOT_FOUND);
            };
            write(&mut c, ret, &(value as u64).to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: Ctx<'_>,
         key_ptr: i32,
         key_size: i32,
         ret_ptr: i32,
         ret_size: i32,
         ret_cas: i32|
         -> Result<i32, Error> {
            c.data_mut().count("proxy_get_shared_data");
            let key = read(&c, key_ptr, key_size)?;
            let Some((value, cas)) = c.data().shared_data.get(&key).cloned() else {
                return Ok(NOT_FOUND);
            };
            give(&mut c, &value, ret_ptr, ret_size)?;
            write_u32(&mut c, ret_cas, cas)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: Ctx<'_>,
         key_ptr: i32,
         key_size: i32,
         value_ptr: i32,
         value_size: i32,
         cas: i32|
         -> Result<i32, Error> {
            c.data_mut().count("proxy_set_shared_data");
            let key = read(&c, key_ptr, key_size)?;
            let value = read(&c, value_ptr, value_size)?;
            let entry = c
                .data_mut()
                .shared_data
                .entry(key)
                .or_insert((Vec::new(), 0));
            if cas != 0 && entry.1 != cas as u32 {
                // CasMismatch.
                return Ok(8);
            }
            *entry = (value, entry.1 + 1);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_register_shared_queue",
        |mut c: Ctx<'_>, name_ptr: i32, name_size: i32, ret: i32| -> Result<i32, Error> {
            c.data_mut().count("proxy_register_shared_queue");
            let name = read(&c, name_ptr, name_size)?;
            let queues = &mut c.data_mut().queues;
            let id = match queues.iter().position(|q| *q == name) {
                Some(id) => id,
                None => {
                    queues.push(name);
                    queues.len() - 1
                }
            };
            write_u32(&mut c, ret, id as u32)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |mut c: Ctx<'_>, id: i32, ptr: i32, size: i32| -> Result<i32, Error> {
            c.data_mut().count("proxy_enqueue_shared_queue");
            let message = read(&c, ptr, size)?;
            let state = c.data_mut();
            if id < 0 || id as usize >= state.queues.len() {
                return Ok(NOT_FOUND);
            }
            state.queued.push((id as u32, message));
            state.posted_wakeups.push(id as u32);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |mut c: Ctx<'_>, id: i32, ret_ptr: i32, ret_size: i32| -> Result<i32, Error> {
            c.data_mut().count("proxy_dequeue_shared_queue");
            let state = c.data_mut();
            let Some(index) = state.queued.iter().position(|(q, _)| *q as i32 == id) else {
                return Ok(EMPTY);
            };
            let (_, message) = state.queued.remove(index);
            if message.is_empty() {
                // Envoy allocates nothing for an empty message: a null pointer, size 0.
                write_u32(&mut c, ret_ptr, 0)?;
                write_u32(&mut c, ret_size, 0)?;
            } else {
                give(&mut c, &message, ret_ptr, ret_size)?;
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_http_call",
        |mut c: Ctx<'_>,
         _up: i32,
         _ups: i32,
         _h: i32,
         _hs: i32,
         _b: i32,
         _bs: i32,
         _t: i32,
         _ts: i32,
         _timeout: i32,
         ret: i32|
         -> Result<i32, Error> {
            let state = c.data_mut();
            state.count("proxy_http_call");
            state.http_calls += 1;
            let token = state.http_calls;
            state.calls_in_flight.push(token);
            write_u32(&mut c, ret, token)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(ENV, "proxy_done", |mut c: Ctx<'_>| -> i32 {
        c.data_mut().count("proxy_done");
        OK
    })?;
    linker.func_wrap(
        ENV,
        "proxy_set_effective_context",
        |mut c: Ctx<'_>, _context: i32| -> i32 {
            c.data_mut().count("proxy_set_effective_context");
            OK
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_continue_stream",
        |mut c: Ctx<'_>, _stream: i32| -> i32 {
            c.data_mut().count("proxy_continue_stream");
            OK
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_call_foreign_function",
        |mut c: Ctx<'_>, _n: i32, _ns: i32, _a: i32, _as: i32, _rp: i32, _rs: i32| -> i32 {
            c.data_mut().count("proxy_call_foreign_function");
            NOT_FOUND
        },
    )?;
    Ok(())
}

fn define_wasi(linker: &mut Linker<HostState>) -> Result<(), Error> {
    const WASI: &str = "wasi_snapshot_preview1";
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut c: Ctx<'_>, _fd: i32, iovs: i32, count: i32, written: i32| -> Result<i32, Error> {
            c.data_mut().count("wasi fd_write");
            let vectors = read(&c, iovs, count.saturating_mul(8))?;
            let total: u32 = vectors
                .chunks_exact(8)
                .map(|v| u32::from_le_bytes([v[4], v[5], v[6], v[7]]))
                .sum();
            write_u32(&mut c, written, total)?;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        WASI,
        "random_get",
        |mut c: Ctx<'_>, buf: i32, len: i32| -> Result<i32, Error> {
            c.data_mut().count("wasi random_get");
            let mut bytes = Vec::with_capacity(len as u32 as usize + 8);
            while bytes.len() < len as u32 as usize {
                let word = c.data_mut().next_random();
                bytes.extend_from_slice(&word.to_le_bytes());
            }
            bytes.truncate(len as u32 as usize);
            write(&mut c, buf, &bytes)?;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut c: Ctx<'_>, _id: i32, _precision: i64, ret: i32| -> Result<i32, Error> {
            let state = c.data_mut();
            state.count("wasi clock_time_get");
            state.clock_ns += 50_000;
            let now = state.clock_ns;
            write(&mut c, ret, &now.to_le_bytes())?;
            Ok(0)
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        linker.func_wrap(
            WASI,
            name,
            move |mut c: Ctx<'_>, count: i32, size: i32| -> Result<i32, Error> {
                c.data_mut().count(&format!("wasi {name}"));
                write_u32(&mut c, count, 0)?;
                write_u32(&mut c, size, 0)?;
                Ok(0)
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        linker.func_wrap(WASI, name, move |mut c: Ctx<'_>, _a: i32, _b: i32| -> i32 {
            c.data_mut().count(&format!("wasi {name}"));
            0
        })?;
    }
    linker.func_wrap(
        WASI,
        "proc_exit",
        |_c: Ctx<'_>, code: i32| -> Result<(), Error> { Err(Error::i32_exit(code)) },
    )?;
    Ok(())
}
