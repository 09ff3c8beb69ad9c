//! `meshcanary report`: a rollout's event stream as one self-contained HTML page.
//!
//! The input is what `meshcanary run --output json` or `serve --output json` prints: one
//! JSON object per line (`{"t", "event", "message", …}`; `serve DIR` adds `"rollout"`).
//! Lines that are not JSON objects (a shell's banner, a text progress line) and objects
//! without `"t"` and `"event"` are not events and are skipped; a line that starts like a
//! JSON object but is not one, or an event whose fields have the wrong types, is an error
//! naming its line.
//!
//! The stream is cut into rollouts: by the `"rollout"` field (none = one unnamed rollout),
//! and, within one name, a `start` or `resume` after verdicts or applied weights begins a
//! new run of it (a new release under `serve`, or `run` outputs appended to one file). The
//! page has one section per rollout run, in the order they first appear, each with four
//! plots drawn as inline SVG (no scripts, no fetches: the page is complete offline):
//!
//! 1. the canary's weight over time (from `applied`), with every promotion, completion,
//!    rollback and abort marked;
//! 2. the canary's and the baseline's error rate over time;
//! 3. their slow-request rate over time;
//! 4. the tests' evidence Λ (errors, slow) against the rollback boundary ln(2/α);
//!
//! and a table of the verdicts with their reasons and numbers. Rates are per span between
//! two printed verdicts: a verdict's `numbers` hold the counts since its step began, so
//! the difference of two verdicts of one step is what happened between them (a step's
//! first verdict counts from the step's start). Every point carries a tooltip (an SVG
//! `<title>`) with its numbers.

use std::fmt::Write as _;

use serde_json::Value;

/// Why a stream cannot be reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// A line is malformed: not JSON though it looks like an object, or an event whose
    /// fields have the wrong types.
    #[error("line {line}: {message}")]
    Invalid {
        /// 1-based line number in the input.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The input holds no meshcanary events at all.
    #[error("no meshcanary events in the input (expected the JSON lines of `meshcanary run --output json` or `serve --output json`)")]
    NoEvents,
}

/// Counts over a span: requests, errors, slow requests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// Requests.
    pub requests: f64,
    /// Requests answered with a 5xx.
    pub errors: f64,
    /// Requests slower than the latency threshold.
    pub slow: f64,
}

/// One verdict (`hold`, `promote`, `complete`, `rollback`) with the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct VerdictPoint {
    /// Seconds since the controller started.
    pub t: f64,
    /// The verdict's kind.
    pub kind: String,
    /// Its reason in words.
    pub reason: String,
    /// Index of the step judged.
    pub step: u64,
    /// The step's canary weight, percent.
    pub weight: f64,
    /// The canary's counts since the step began.
    pub canary: Counts,
    /// The baseline's counts since the step began.
    pub baseline: Counts,
    /// The error test's Λ over the rollout.
    pub errors_llr: f64,
    /// The slow test's Λ over the rollout.
    pub slow_llr: f64,
    /// Λ at which a test rolls back.
    pub rollback_at: f64,
}

/// One rollout run of the stream, as the page shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutRun {
    /// The `"rollout"` field of its lines (empty when the stream has none).
    pub name: String,
    /// 1 for the first run of this name in the stream, 2 for the next, …
    pub run: usize,
    /// The steps from its `start` event (canary percent), when seen.
    pub steps: Vec<u64>,
    /// The canary variant and the baseline variants from `start`, when seen.
    pub canary: Option<String>,
    /// The baseline variants.
    pub baseline: Vec<String>,
    /// `(t, weight)` of every `applied` event.
    pub applied: Vec<(f64, f64)>,
    /// Every verdict with numbers.
    pub verdicts: Vec<VerdictPoint>,
    /// `(t, message)` of `aborted` events (an operator's abort).
    pub aborts: Vec<(f64, String)>,
    /// `(t, kind, message)` of `source` and `error` events.
    pub incidents: Vec<(f64, String, String)>,
    /// The outcome of a `finished` event (`Promoted`, `RolledBack(…)`, `Aborted`).
    pub finished: Option<String>,
    /// Time of its first and last event.
    pub span: (f64, f64),
}

impl RolloutRun {
    /// The section's title: the rollout's name (`run` streams have none: the canary's
    /// then), and the run's number after the first.
    pub fn title(&self) -> String {
        let name = match (&self.canary, self.name.is_empty()) {
            (Some(canary), true) => format!("rollout of {canary}"),
            (None, true) => "rollout".to_string(),
            (_, false) => self.name.clone(),
        };
        if self.run > 1 {
            format!("{name} (run {})", self.run)
        } else {
            name.to_string()
        }
    }

    /// How it ended, in words, from `finished` or else its last verdict.
    pub fn outcome(&self) -> String {
        if let Some(outcome) = &self.finished {
            // `run` prints the outcome's Rust form: `Promoted`, `RolledBack("reason")`, `Aborted`.
            return match outcome.as_str() {
                "Promoted" => "promoted".to_string(),
                "Aborted" => "aborted".to_string(),
                other => match other
                    .strip_prefix("RolledBack(\"")
                    .and_then(|r| r.strip_suffix("\")"))
                {
                    Some(reason) => format!("rolled back: {reason}"),
                    None => other.to_string(),
                },
            };
        }
        if let Some((_, message)) = self.aborts.last() {
            return format!("aborted: {message}");
        }
        match self.verdicts.last() {
            Some(v) if v.kind == "complete" => "promoted".to_string(),
            Some(v) if v.kind == "rollback" => format!("rolled back: {}", v.reason),
            Some(v) => format!(
                "in progress when the stream ends (step {}, {} %)",
                v.step + 1,
                v.weight
            ),
            None => "no verdict in the stream".to_string(),
        }
    }

    fn has_progress(&self) -> bool {
        !self.applied.is_empty() || !self.verdicts.is_empty() || self.finished.is_some()
    }
}

/// Reads an event stream: every rollout run in it, in order of first appearance.
pub fn parse(text: &str) -> Result<Vec<RolloutRun>, ReportError> {
    let mut runs: Vec<RolloutRun> = Vec::new();
    // Index in `runs` of the current run of each name.
    let mut current: Vec<(String, usize)> = Vec::new();
    let mut events = 0usize;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if !trimmed.starts_with('{') {
            continue;
        }
        let invalid = |message: String| ReportError::Invalid { line, message };
        let value: Value = serde_json::from_str(trimmed)
            .map_err(|e| invalid(format!("not a valid JSON object: {e}")))?;
        let (Some(kind), Some(t)) = (value["event"].as_str(), value.get("t")) else {
            continue;
        };
        let t = t
            .as_f64()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| invalid(format!("{kind} event: \"t\" must be a number ≥ 0")))?;
        let name = match value.get("rollout") {
            None => String::new(),
            Some(Value::String(name)) => name.clone(),
            Some(_) => {
                return Err(invalid(format!(
                    "{kind} event: \"rollout\" must be a string"
                )))
            }
        };
        events += 1;
        let slot = current.iter().find(|(n, _)| *n == name).map(|(_, i)| *i);
        let starts = matches!(kind, "start" | "resume");
        let index = match slot {
            Some(i) if !(starts && runs[i].has_progress()) => i,
            _ => {
                let run = runs.iter().filter(|r| r.name == name).count() + 1;
                runs.push(RolloutRun {
                    name: name.clone(),
                    run,
                    span: (t, t),
                    ..RolloutRun::default()
                });
                let i = runs.len() - 1;
                current.retain(|(n, _)| *n != name);
                current.push((name, i));
                i
            }
        };
        let target = &mut runs[index];
        target.span.1 = target.span.1.max(t);
        target.span.0 = target.span.0.min(t);
        let message = value["message"].as_str().unwrap_or_default().to_string();
        match kind {
            "start" => {
                if let Some(steps) = value.get("steps") {
                    target.steps = steps
                        .as_array()
                        .and_then(|s| s.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| {
                            invalid("start event: \"steps\" must be a list of percentages".into())
                        })?;
                }
                target.canary = value["canary"].as_str().map(str::to_string);
                target.baseline = value["baseline"]
                    .as_array()
                    .map(|b| {
                        b.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            "applied" => {
                let weight = value["weight"]
                    .as_f64()
                    .filter(|w| (0.0..=100.0).contains(w))
                    .ok_or_else(|| {
                        invalid("applied event: \"weight\" must be a percentage 0–100".into())
                    })?;
                target.applied.push((t, weight));
            }
            "hold" | "promote" | "complete" | "rollback" => {
                // A hold that only repeats the previous one is not printed with numbers by
                // older controllers; without numbers there is nothing to plot.
                if value.get("numbers").is_none() {
                    continue;
                }
                let point = verdict_point(t, kind, &message, &value)
                    .map_err(|field| invalid(format!("{kind} event: {field}")))?;
                target.verdicts.push(point);
            }
            "aborted" => target.aborts.push((t, message)),
            "source" | "error" => target.incidents.push((t, kind.to_string(), message)),
            "finished" => {
                target.finished = Some(
                    value["outcome"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or(message),
                )
            }
            _ => {}
        }
    }
    if events == 0 {
        return Err(ReportError::NoEvents);
    }
    Ok(runs)
}

/// A verdict event's numbers; `Err` names the field at fault.
fn verdict_point(t: f64, kind: &str, message: &str, value: &Value) -> Result<VerdictPoint, String> {
    let n = &value["numbers"];
    let number = |path: &[&str]| -> Result<f64, String> {
        let mut v = n;
        for key in path {
            v = &v[*key];
        }
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("numbers.{} must be a finite number", path.join(".")))
    };
    let counts = |side: &str| -> Result<Counts, String> {
        Ok(Counts {
            requests: number(&[side, "requests"])?,
            errors: number(&[side, "errors"])?,
            slow: number(&[side, "slow"])?,
        })
    };
    let step = n["step"]
        .as_u64()
        .ok_or_else(|| "numbers.step must be a step index".to_string())?;
    // The reason: the event's own field, else the message's "VERDICT: reason | numbers".
    let reason = value["reason"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            let head = message.split(" | ").next().unwrap_or_default();
            head.split_once(": ")
                .map_or(head, |(_, reason)| reason)
                .to_string()
        });
    Ok(VerdictPoint {
        t,
        kind: kind.to_string(),
        reason,
        step,
        weight: number(&["weight"])?,
        canary: counts("canary")?,
        baseline: counts("baseline")?,
        errors_llr: number(&["errors_llr", "llr"])?,
        slow_llr: number(&["slow_llr", "llr"])?,
        rollback_at: number(&["rollback_at"])?,
    })
}

/// The rates of one side between verdicts: `(t, errors/requests, slow/requests, requests)`
/// for each span with requests. A verdict's counts run from its step's start, so a span
/// is the difference to the previous verdict of the same step, or the counts themselves
/// for a step's first verdict.
pub fn span_rates(verdicts: &[VerdictPoint], canary: bool) -> Vec<(f64, f64, f64, f64)> {
    let side = |v: &VerdictPoint| if canary { v.canary } else { v.baseline };
    let mut out = Vec::new();
    let mut previous: Option<&VerdictPoint> = None;
    for v in verdicts {
        let now = side(v);
        let base = match previous {
            Some(p) if p.step == v.step && p.kind == "hold" => side(p),
            _ => Counts::default(),
        };
        let requests = now.requests - base.requests;
        let errors = now.errors - base.errors;
        let slow = now.slow - base.slow;
        if requests > 0.0 && errors >= 0.0 && slow >= 0.0 {
            out.push((v.t, errors / requests, slow / requests, requests));
        }
        previous = Some(v);
    }
    out
}

/// The whole page. `source` names the input (shown in the header).
pub fn render(runs: &[RolloutRun], source: &str) -> String {
    let mut html = String::new();
    let title = match runs {
        [one] => format!("meshcanary report: {}", one.title()),
        _ => format!("meshcanary report: {} rollouts", runs.len()),
    };
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n\
         <p class=\"source\">From <code>{}</code>: {} rollout run(s). Times are seconds since the \
         controller started. Hover a point for its numbers.</p>\n",
        escape(&title),
        escape(&title),
        escape(source),
        runs.len()
    );
    if runs.len() > 1 {
        html.push_str("<nav><ul>");
        for (i, run) in runs.iter().enumerate() {
            let _ = write!(
                html,
                "<li><a href=\"#rollout-{i}\">{}</a> — {}</li>",
                escape(&run.title()),
                escape(&run.outcome())
            );
        }
        html.push_str("</ul></nav>\n");
    }
    for (i, run) in runs.iter().enumerate() {
        section(&mut html, i, run);
    }
    html.push_str("</body>\n</html>\n");
    html
}

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:960px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:19px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:36px}
.source{color:#555}dl.summary{display:grid;grid-template-columns:max-content auto;gap:2px 16px}
dt{font-weight:600}dd{margin:0}figure{margin:16px 0}figcaption{font-weight:600;margin-bottom:4px}
svg.plot{display:block;background:#fff}svg text{font-size:11px;fill:#333}
.grid{stroke:#e3e3e3;stroke-width:1}.axis{stroke:#888;stroke-width:1}
.plot-area{fill:#fafafa;stroke:#bbb}
.series polyline{fill:none;stroke-width:2}
.s-weight polyline{stroke:#6741d9}.s-weight circle{fill:#6741d9}
.s-canary polyline{stroke:#e8590c}.s-canary circle{fill:#e8590c}
.s-baseline polyline{stroke:#1971c2}.s-baseline circle{fill:#1971c2}
.s-errors polyline{stroke:#e8590c}.s-errors circle{fill:#e8590c}
.s-slow polyline{stroke:#0c8599}.s-slow circle{fill:#0c8599}
.boundary line{stroke:#c92a2a;stroke-width:1.5;stroke-dasharray:6 4}.boundary text{fill:#c92a2a}
.marker line{stroke-width:1.5;stroke-dasharray:3 3}
.m-promote line{stroke:#2f9e44}.m-complete line{stroke:#2b8a3e}.m-rollback line{stroke:#c92a2a}.m-aborted line{stroke:#862e9c}
.m-promote text,.m-complete text{fill:#2b8a3e}.m-rollback text{fill:#c92a2a}.m-aborted text{fill:#862e9c}
.legend text{font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f1f3f5}td.num{text-align:right;white-space:nowrap}
tr.v-promote td,tr.v-complete td{background:#ebfbee}tr.v-rollback td{background:#fff5f5}tr.v-aborted td{background:#f8f0fc}
.none{color:#777;font-style:italic}
";

fn section(html: &mut String, index: usize, run: &RolloutRun) {
    let _ = write!(
        html,
        "<section class=\"rollout\" id=\"rollout-{index}\" data-rollout=\"{}\">\n<h2>{}</h2>\n",
        escape(&run.title()),
        escape(&run.title())
    );
    let steps: Vec<String> = run.steps.iter().map(u64::to_string).collect();
    let _ = writeln!(
        html,
        "<dl class=\"summary\"><dt>outcome</dt><dd class=\"outcome\">{}</dd>\
         <dt>steps</dt><dd>{}</dd><dt>canary</dt><dd>{}</dd><dt>baseline</dt><dd>{}</dd>\
         <dt>events</dt><dd>{:.1} s – {:.1} s: {} weights applied, {} verdicts with numbers</dd></dl>",
        escape(&run.outcome()),
        if steps.is_empty() {
            "—".to_string()
        } else {
            format!("{} %", steps.join(" → "))
        },
        escape(run.canary.as_deref().unwrap_or("—")),
        escape(&run.baseline.join(", ")),
        run.span.0,
        run.span.1,
        run.applied.len(),
        run.verdicts.len()
    );
    let x_range = (run.span.0, run.span.1.max(run.span.0 + 1.0));
    let markers = markers(run);

    // 1. The weight as a step function, held until the last event.
    let mut weight = Vec::new();
    for (i, &(t, w)) in run.applied.iter().enumerate() {
        if i > 0 {
            let previous = run.applied[i - 1].1;
            weight.push(Point::line(t, previous));
        }
        weight.push(Point::dot(
            t,
            w,
            format!("{t:.1} s: canary at {w} % (applied)"),
        ));
    }
    if let Some(&(t, w)) = run.applied.last() {
        if run.span.1 > t {
            weight.push(Point::line(run.span.1, w));
        }
    }
    figure(
        html,
        &Chart {
            id: format!("weight-{index}"),
            kind: "weight",
            caption: "Canary weight (%) — promotions, completion and rollback marked",
            x_range,
            y_range: (0.0, 100.0),
            percent: false,
            series: vec![Series {
                name: "canary weight".into(),
                class: "s-weight",
                points: weight,
            }],
            boundary: None,
            markers: &markers,
        },
    );

    // 2 and 3. Error and slow rates of each side, per span between verdicts.
    let canary = span_rates(&run.verdicts, true);
    let baseline = span_rates(&run.verdicts, false);
    let canary_name = run.canary.clone().unwrap_or_else(|| "canary".into());
    let baseline_name = if run.baseline.is_empty() {
        "baseline".to_string()
    } else {
        format!("baseline ({})", run.baseline.join(", "))
    };
    for (kind, caption, pick, what) in [
        (
            "error-rate",
            "Error rate (5xx share) per span between verdicts",
            1usize,
            "errors",
        ),
        (
            "slow-rate",
            "Slow-request rate (share above the latency threshold) per span between verdicts",
            2,
            "slow",
        ),
    ] {
        let to_points = |rates: &[(f64, f64, f64, f64)], side: &str| -> Vec<Point> {
            rates
                .iter()
                .map(|r| {
                    let rate = if pick == 1 { r.1 } else { r.2 };
                    Point::dot(
                        r.0,
                        rate,
                        format!(
                            "{:.1} s: {side} {:.2} % {what} of {:.0} requests",
                            r.0,
                            rate * 100.0,
                            r.3
                        ),
                    )
                })
                .collect()
        };
        let series = vec![
            Series {
                name: canary_name.clone(),
                class: "s-canary",
                points: to_points(&canary, &canary_name),
            },
            Series {
                name: baseline_name.clone(),
                class: "s-baseline",
                points: to_points(&baseline, "baseline"),
            },
        ];
        let top = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.y))
            .fold(0.0f64, f64::max);
        figure(
            html,
            &Chart {
                id: format!("{kind}-{index}"),
                kind,
                caption,
                x_range,
                y_range: (0.0, nice_top((top * 1.15).max(0.01))),
                percent: true,
                series,
                boundary: None,
                markers: &markers,
            },
        );
    }

    // 4. Evidence against the rollback boundary.
    let boundary = run.verdicts.last().map(|v| v.rollback_at);
    let llr = |errors: bool| -> Vec<Point> {
        run.verdicts
            .iter()
            .map(|v| {
                let y = if errors { v.errors_llr } else { v.slow_llr };
                Point::dot(
                    v.t,
                    y,
                    format!(
                        "{:.1} s: Λ {} {:.2} (rolls back at {:.2}), {}",
                        v.t,
                        if errors { "errors" } else { "slow" },
                        y,
                        v.rollback_at,
                        v.kind
                    ),
                )
            })
            .collect()
    };
    let series = vec![
        Series {
            name: "Λ errors".into(),
            class: "s-errors",
            points: llr(true),
        },
        Series {
            name: "Λ slow".into(),
            class: "s-slow",
            points: llr(false),
        },
    ];
    let (low, high) = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.y))
        .chain(boundary)
        .fold((0.0f64, 1.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    figure(
        html,
        &Chart {
            id: format!("evidence-{index}"),
            kind: "evidence",
            caption: "Evidence of a regression Λ (log-likelihood ratio over the rollout) against the rollback boundary ln(2/α)",
            x_range,
            y_range: (nice_bottom(low * 1.1), nice_top(high * 1.1)),
            percent: false,
            series,
            boundary: boundary.map(|b| (b, format!("rollback at {b:.2}"))),
            markers: &markers,
        },
    );

    table(html, run);
    html.push_str("</section>\n");
}

/// A vertical mark on every plot: a verdict that moved the weight, or an abort.
struct Marker {
    t: f64,
    kind: String,
    label: String,
}

fn markers(run: &RolloutRun) -> Vec<Marker> {
    let mut out: Vec<Marker> = run
        .verdicts
        .iter()
        .filter(|v| v.kind != "hold")
        .map(|v| Marker {
            t: v.t,
            kind: v.kind.clone(),
            label: match v.kind.as_str() {
                "promote" => match usize::try_from(v.step + 1)
                    .ok()
                    .and_then(|next| run.steps.get(next))
                {
                    Some(weight) => format!("promote → {weight} %"),
                    None => format!("promote (step {} passed)", v.step + 1),
                },
                other => other.to_string(),
            },
        })
        .collect();
    out.extend(run.aborts.iter().map(|(t, _)| Marker {
        t: *t,
        kind: "aborted".into(),
        label: "aborted".into(),
    }));
    out
}

/// A point of a series: `tip` is its tooltip; a point without one is a bend of the line
/// only (a step function's corner), not drawn as a dot.
struct Point {
    x: f64,
    y: f64,
    tip: Option<String>,
}

impl Point {
    fn dot(x: f64, y: f64, tip: String) -> Point {
        Point {
            x,
            y,
            tip: Some(tip),
        }
    }
    fn line(x: f64, y: f64) -> Point {
        Point { x, y, tip: None }
    }
}

struct Series {
    name: String,
    class: &'static str,
    points: Vec<Point>,
}

struct Chart<'a> {
    id: String,
    kind: &'static str,
    caption: &'static str,
    x_range: (f64, f64),
    y_range: (f64, f64),
    /// Y values are shares, shown as percent.
    percent: bool,
    series: Vec<Series>,
    /// A horizontal line: its y and its label.
    boundary: Option<(f64, String)>,
    markers: &'a [Marker],
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 250.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 34.0;

fn figure(html: &mut String, chart: &Chart) {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let (x0, x1) = chart.x_range;
    let (y0, y1) = if chart.y_range.1 > chart.y_range.0 {
        chart.y_range
    } else {
        (chart.y_range.0, chart.y_range.0 + 1.0)
    };
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * plot_w;
    let sy = |y: f64| TOP + plot_h - (y.clamp(y0, y1) - y0) / (y1 - y0) * plot_h;
    let _ = write!(
        html,
        "<figure class=\"plot\" data-plot=\"{kind}\"><figcaption>{}</figcaption>\n\
         <svg class=\"plot\" id=\"{id}\" data-plot=\"{kind}\" xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\">\n\
         <rect class=\"plot-area\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\"/>\n",
        escape(chart.caption),
        escape(chart.caption),
        kind = chart.kind,
        id = chart.id,
    );
    for tick in ticks(y0, y1) {
        let y = sy(tick);
        let label = if chart.percent {
            format!("{} %", trim_number(tick * 100.0))
        } else {
            trim_number(tick)
        };
        let _ = writeln!(
            html,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for tick in ticks(x0, x1) {
        let x = sx(tick);
        let _ = writeln!(
            html,
            "<line class=\"grid\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{:.1}\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + plot_h,
            TOP + plot_h + 15.0,
            trim_number(tick)
        );
    }
    let _ = writeln!(
        html,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 4.0
    );
    if let Some((b, label)) = &chart.boundary {
        let y = sy(*b);
        let _ = writeln!(
            html,
            "<g class=\"boundary\" data-value=\"{b}\"><line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text></g>",
            LEFT + plot_w,
            LEFT + plot_w + 6.0,
            y + 4.0,
            escape(label)
        );
    }
    for marker in chart.markers {
        let x = sx(marker.t);
        let _ = writeln!(
            html,
            "<g class=\"marker m-{kind}\" data-verdict=\"{kind}\" data-t=\"{t}\"><title>{t:.1} s: {label}</title>\
             <line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" transform=\"rotate(-90 {:.1} {:.1})\">{label}</text></g>",
            TOP + plot_h,
            x - 3.0,
            TOP + plot_h - 4.0,
            x - 3.0,
            TOP + plot_h - 4.0,
            kind = escape(&marker.kind),
            t = marker.t,
            label = escape(&marker.label),
        );
    }
    for (i, series) in chart.series.iter().enumerate() {
        let dots = series.points.iter().filter(|p| p.tip.is_some()).count();
        let _ = write!(
            html,
            "<g class=\"series {}\" data-series=\"{}\" data-points=\"{dots}\">",
            series.class,
            escape(&series.name)
        );
        if series.points.len() > 1 {
            let coords: Vec<String> = series
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", sx(p.x), sy(p.y)))
                .collect();
            let _ = write!(html, "<polyline points=\"{}\"/>", coords.join(" "));
        }
        for p in &series.points {
            if let Some(tip) = &p.tip {
                let _ = write!(
                    html,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\"><title>{}</title></circle>",
                    sx(p.x),
                    sy(p.y),
                    escape(tip)
                );
            }
        }
        // The legend, right of the plot.
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let _ = write!(
            html,
            "<g class=\"legend\"><line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" style=\"stroke-width:3\"/>\
             <circle cx=\"{:.1}\" cy=\"{ly:.1}\" r=\"3.5\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text></g>",
            LEFT + plot_w + 8.0,
            LEFT + plot_w + 28.0,
            LEFT + plot_w + 18.0,
            LEFT + plot_w + 34.0,
            ly + 4.0,
            escape(&truncate(&series.name, 20))
        );
        html.push_str("</g>\n");
        if dots == 0 {
            let _ = writeln!(
                html,
                "<text class=\"none\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}: no data in the stream</text>",
                LEFT + plot_w / 2.0,
                TOP + 20.0 + 16.0 * i as f64,
                escape(&series.name)
            );
        }
    }
    html.push_str("</svg></figure>\n");
}

fn table(html: &mut String, run: &RolloutRun) {
    html.push_str(
        "<table class=\"verdicts\"><caption>Verdicts (counts since the step began, Λ over the rollout)</caption>\
         <thead><tr><th>t (s)</th><th>verdict</th><th>step</th><th>canary req / err / slow</th>\
         <th>baseline req / err / slow</th><th>Λ errors / slow (rollback at)</th><th>reason</th></tr></thead><tbody>\n",
    );
    let mut rows: Vec<(f64, String)> = Vec::new();
    for v in &run.verdicts {
        let counts = |c: &Counts| {
            let rate = if c.requests > 0.0 {
                format!(" ({:.2} %)", 100.0 * c.errors / c.requests)
            } else {
                String::new()
            };
            format!("{:.0} / {:.0}{rate} / {:.0}", c.requests, c.errors, c.slow)
        };
        rows.push((
            v.t,
            format!(
                "<tr class=\"verdict v-{kind}\" data-verdict=\"{kind}\"><td class=\"num\">{:.1}</td><td>{kind}</td>\
                 <td class=\"num\">{} ({} %)</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{:.2} / {:.2} ({:.2})</td><td>{}</td></tr>\n",
                v.t,
                v.step + 1,
                v.weight,
                counts(&v.canary),
                counts(&v.baseline),
                v.errors_llr,
                v.slow_llr,
                v.rollback_at,
                escape(&v.reason),
                kind = escape(&v.kind),
            ),
        ));
    }
    for (t, message) in &run.aborts {
        rows.push((
            *t,
            format!(
                "<tr class=\"verdict v-aborted\" data-verdict=\"aborted\"><td class=\"num\">{t:.1}</td><td>aborted</td>\
                 <td></td><td></td><td></td><td></td><td>{}</td></tr>\n",
                escape(message)
            ),
        ));
    }
    for (t, kind, message) in &run.incidents {
        rows.push((
            *t,
            format!(
                "<tr class=\"incident\" data-kind=\"{kind}\"><td class=\"num\">{t:.1}</td><td>{kind}</td>\
                 <td></td><td></td><td></td><td></td><td>{}</td></tr>\n",
                escape(message),
                kind = escape(kind),
            ),
        ));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    if rows.is_empty() {
        html.push_str("<tr><td colspan=\"7\" class=\"none\">no verdicts in the stream</td></tr>\n");
    }
    for (_, row) in rows {
        html.push_str(&row);
    }
    html.push_str("</tbody></table>\n");
}

/// About five round ticks covering `[low, high]`.
fn ticks(low: f64, high: f64) -> Vec<f64> {
    let span = high - low;
    if !(span.is_finite() && span > 0.0) {
        return vec![low];
    }
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * magnitude);
    let mut out = Vec::new();
    let mut tick = (low / step).ceil() * step;
    while tick <= high + step * 1e-9 && out.len() < 20 {
        out.push(tick);
        tick += step;
    }
    out
}

/// A round number at or above `x`.
fn nice_top(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let magnitude = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * magnitude)
}

/// A round number at or below `x` (0 for `x ≥ 0`).
fn nice_bottom(x: f64) -> f64 {
    if x >= 0.0 {
        0.0
    } else {
        -nice_top(-x)
    }
}

/// `12.0` → `12`, `0.25` → `0.25`: tick labels without float noise.
fn trim_number(x: f64) -> String {
    let text = format!("{:.3}", x);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut short: String = text.chars().take(max - 1).collect();
        short.push('…');
        short
    }
}

/// Text for HTML and SVG, content and attribute values alike.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(t: f64, kind: &str, step: u64, canary: (f64, f64), baseline: (f64, f64)) -> String {
        serde_json::json!({
            "t": t, "event": kind, "message": format!("{}: because | numbers", kind.to_uppercase()),
            "verdict": kind,
            "numbers": {
                "step": step, "weight": 10,
                "canary": {"requests": canary.0, "errors": canary.1, "slow": 0.0},
                "baseline": {"requests": baseline.0, "errors": baseline.1, "slow": 1.0},
                "errors_llr": {"llr": t / 10.0, "step_llr": 0.0},
                "slow_llr": {"llr": 0.0, "step_llr": 0.0},
                "rollback_at": 7.6, "accept_at": -3.0
            }
        })
        .to_string()
    }

    #[test]
    fn spans_between_verdicts_of_one_step_are_differences() {
        let text = [
            "meshcanary demo banner (not an event)".to_string(),
            r#"{"t":0.0,"event":"start","message":"m","steps":[10,100],"canary":"canary","baseline":["stable"]}"#.to_string(),
            r#"{"t":0.1,"event":"applied","message":"m","weight":10}"#.to_string(),
            verdict(1.0, "hold", 0, (100.0, 1.0), (900.0, 9.0)),
            verdict(2.0, "hold", 0, (300.0, 5.0), (2700.0, 9.0)),
            verdict(3.0, "promote", 0, (400.0, 5.0), (3600.0, 18.0)),
            r#"{"t":3.1,"event":"applied","message":"m","weight":100}"#.to_string(),
            verdict(4.0, "hold", 1, (50.0, 0.0), (50.0, 0.0)),
        ]
        .join("\n");
        let runs = parse(&text).expect("parses");
        assert_eq!(runs.len(), 1);
        let run = &runs[0];
        assert_eq!(run.steps, vec![10, 100]);
        assert_eq!(run.applied, vec![(0.1, 10.0), (3.1, 100.0)]);
        let canary = span_rates(&run.verdicts, true);
        let rates: Vec<(f64, f64)> = canary.iter().map(|r| (r.0, r.1)).collect();
        // 1/100, then (5-1)/(300-100), then 0/100, then the new step's own 0/50.
        assert_eq!(
            rates,
            vec![(1.0, 0.01), (2.0, 0.02), (3.0, 0.0), (4.0, 0.0)]
        );
        let baseline = span_rates(&run.verdicts, false);
        assert_eq!(baseline[1].1, 0.0);
        assert_eq!(baseline[2].1, 0.01);
        assert_eq!(
            run.outcome(),
            "in progress when the stream ends (step 2, 10 %)"
        );
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let text = "ignored text\n{\"t\": 1, \"event\": \"start\"}\n{\"t\": 2, \"event\": \n";
        match parse(text) {
            Err(ReportError::Invalid { line, .. }) => assert_eq!(line, 3),
            other => panic!("expected an error on line 3, got {other:?}"),
        }
        let text = "{\"t\": 1, \"event\": \"applied\", \"weight\": \"ten\"}";
        let err = parse(text).expect_err("bad weight");
        assert_eq!(
            err.to_string(),
            "line 1: applied event: \"weight\" must be a percentage 0–100"
        );
        let text = verdict(1.0, "hold", 0, (1.0, 0.0), (1.0, 0.0)).replace("\"errors\":0.0,", "");
        let err = parse(&text).expect_err("missing errors");
        assert!(
            err.to_string()
                .contains("numbers.canary.errors must be a finite number"),
            "{err}"
        );
        assert_eq!(parse("just text\n\n"), Err(ReportError::NoEvents));
        assert_eq!(parse("{\"not\": \"an event\"}"), Err(ReportError::NoEvents));
    }

    #[test]
    fn a_serve_stream_is_cut_by_rollout_and_by_restart() {
        let line = |t: f64, rollout: &str, event: &str| {
            format!(
                r#"{{"t":{t},"event":"{event}","message":"m","rollout":"{rollout}","weight":10}}"#
            )
        };
        let text = [
            line(0.0, "a.yaml", "start"),
            line(0.1, "b.yaml", "start"),
            line(0.2, "a.yaml", "applied"),
            line(0.3, "b.yaml", "applied"),
            line(5.0, "a.yaml", "start"),
            line(5.1, "a.yaml", "applied"),
        ]
        .join("\n");
        let runs = parse(&text).expect("parses");
        let titles: Vec<String> = runs.iter().map(RolloutRun::title).collect();
        assert_eq!(titles, vec!["a.yaml", "b.yaml", "a.yaml (run 2)"]);
        assert_eq!(runs[2].applied, vec![(5.1, 10.0)]);
    }

    #[test]
    fn the_page_escapes_what_the_stream_says_and_fetches_nothing() {
        let text = [
            r#"{"t":0.0,"event":"start","message":"m","canary":"<script>alert(1)</script>","baseline":["stable"]}"#.to_string(),
            r#"{"t":0.1,"event":"applied","message":"m","weight":10}"#.to_string(),
            verdict(1.0, "hold", 0, (100.0, 1.0), (900.0, 9.0)),
            verdict(2.0, "rollback", 0, (200.0, 50.0), (1800.0, 18.0)),
            r#"{"t":2.1,"event":"applied","message":"m","weight":0}"#.to_string(),
        ]
        .join("\n");
        let runs = parse(&text).expect("parses");
        let html = render(&runs, "run.jsonl");
        assert!(!html.contains("<script"), "input became markup");
        assert!(html.contains("&lt;script&gt;"));
        assert!(!html.contains("src="), "the page must not load anything");
        assert_eq!(html.matches("<svg class=\"plot\"").count(), 4);
        assert_eq!(html.matches("data-verdict=\"rollback\"").count(), 4 + 1);
        assert!(runs[0].outcome().starts_with("rolled back"));
        let finished = r#"{"t":3,"event":"finished","message":"m","outcome":"RolledBack(\"error rate regressed vs baseline\")"}"#;
        let runs = parse(&format!("{text}\n{finished}")).expect("parses");
        assert_eq!(
            runs[0].outcome(),
            "rolled back: error rate regressed vs baseline"
        );
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(0.0, 100.0), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(nice_top(0.013), 0.02);
        assert_eq!(nice_bottom(-0.3), -0.5);
        assert_eq!(trim_number(2.5), "2.5");
    }
}
