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

/// Where events go (standard output), with the time since the command started.
pub struct Output {
    format: Format,
    started: Instant,
    observer: Option<Observer>,
}

impl Output {
    /// Prints in `format`.
    pub fn new(format: Format) -> Output {
        Output {
            format,
            started: Instant::now(),
            observer: None,
        }
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
        let t = self.started.elapsed().as_secs_f64();
        let line = match self.format {
            Format::Text => format!("[{:>7.1}s] {:<8} {}", t, kind, message),
            Format::Json => {
                let mut event =
                    json!({"t": (t * 1000.0).round() / 1000.0, "event": kind, "message": message});
                if let (Some(target), Value::Object(extra)) = (event.as_object_mut(), data) {
                    target.extend(extra);
                }
                event.to_string()
            }
        };
        let mut stdout = std::io::stdout().lock();
        // A closed pipe must not kill a rollout half-way: the line is lost, the run goes on.
        let _ = writeln!(stdout, "{}", line);
        let _ = stdout.flush();
    }
}
