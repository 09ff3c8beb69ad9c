//! Progress output: one line per event, as text for people or JSON lines for machines.

use std::io::Write;
use std::time::Instant;

use serde_json::{json, Value};

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `[  12.3s] promote  …` lines.
    Text,
    /// One JSON object per line: `{"t": 12.3, "event": "promote", "message": …, …}`.
    Json,
}

/// Something that wants to see every event (e.g. the `serve` mode's metrics).
pub type Observer = Box<dyn FnMut(&str, &Value) + Send>;

/// Something that relays every printed event elsewhere, with its message: `(kind,
/// message, data)` (the rollout's `event` webhooks and notifications, [`crate::notify`]).
/// It must be quick and must not block: it runs in the rollout's loop.
pub type Tap = Box<dyn FnMut(&str, &str, &Value) + Send>;

/// Where events go (standard output), with the time since the command started.
pub struct Output {
    format: Format,
    started: Instant,
    observer: Option<Observer>,
    /// Relays printed events (set by the driver for the time of one rollout).
    tap: Option<Tap>,
    /// Names the rollout a line is about when one process drives many (`serve DIR`).
    label: Option<String>,
    /// False for a silent output: observers still see every event (the scale benchmark).
    print: bool,
}

impl Output {
    /// Prints in `format`.
    pub fn new(format: Format) -> Output {
        Output {
            format,
            started: Instant::now(),
            observer: None,
            tap: None,
            label: None,
            print: true,
        }
    }

    /// A new output with the same format, clock and printing, without observer or label:
    /// one per rollout when a process drives many.
    pub fn fork(&self) -> Output {
        Output {
            format: self.format,
            started: self.started,
            observer: None,
            tap: None,
            label: None,
            print: self.print,
        }
    }

    /// Names the rollout on every line: text lines read `[  12.3s] checkout promote …`,
    /// JSON lines carry `"rollout": "checkout"`.
    pub fn with_label(mut self, label: impl Into<String>) -> Output {
        self.label = Some(label.into());
        self
    }

    /// Prints nothing; observers still see every event.
    pub fn silent(mut self) -> Output {
        self.print = false;
        self
    }

    /// The rollout's label, if lines carry one.
    pub fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }

    /// Relays every printed event to `tap` (`None`: no more); returns the previous one.
    pub fn set_tap(&mut self, tap: Option<Tap>) -> Option<Tap> {
        std::mem::replace(&mut self.tap, tap)
    }

    /// The format lines are printed in.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Also hands every event (printed or not) to `observer`.
    pub fn with_observer(mut self, observer: Observer) -> Output {
        self.observer = Some(observer);
        self
    }

    /// Tells the observer about an event without printing it (a hold that repeats the
    /// previous one, say).
    pub fn notify(&mut self, kind: &str, data: &Value) {
        if let Some(observer) = self.observer.as_mut() {
            observer(kind, data);
        }
    }

    /// Prints one event: a kind (`start`, `applied`, `hold`, `promote`, `complete`,
    /// `rollback`, `aborted`, `source`, `error`, …), a human message and its data.
    pub fn event(&mut self, kind: &str, message: String, data: Value) {
        self.notify(kind, &data);
        if let Some(tap) = self.tap.as_mut() {
            tap(kind, &message, &data);
        }
        if !self.print {
            return;
        }
        let t = self.started.elapsed().as_secs_f64();
        let mut line = match (self.format, &self.label) {
            (Format::Text, None) => format!("[{:>7.1}s] {:<8} {}", t, kind, message),
            (Format::Text, Some(label)) => {
                format!("[{:>7.1}s] {} {:<8} {}", t, label, kind, message)
            }
            (Format::Json, _) => {
                let mut event =
                    json!({"t": (t * 1000.0).round() / 1000.0, "event": kind, "message": message});
                if let Some(target) = event.as_object_mut() {
                    if let Some(label) = &self.label {
                        target.insert("rollout".to_string(), Value::String(label.clone()));
                    }
                    if let Value::Object(extra) = data {
                        target.extend(extra);
                    }
                }
                event.to_string()
            }
        };
        line.push('\n');
        // One write of the whole line under the process-wide stdout lock: lines of
        // rollouts driven by different tasks never interleave mid-line.
        let mut stdout = std::io::stdout().lock();
        // A closed pipe must not kill a rollout half-way: the line is lost, the run goes on.
        let _ = stdout.write_all(line.as_bytes());
        let _ = stdout.flush();
    }
}
