//! Turns the rounds into the printed tables, the target verdicts and the JSON record.

use serde_json::{json, Value};

use crate::micro::Timing;
use crate::setups::{Family, Setup};
use crate::wrk::Run;

/// Median, minimum and maximum of a set of values, and how far the median can be trusted.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// A 95 % confidence interval for the median, from the sorted values themselves
    /// (order statistics: no assumption about the noise's distribution). With fewer than
    /// six values no such interval exists, and this is the whole range (`min`, `max`).
    pub low: f64,
    pub high: f64,
}

impl Spread {
    /// The spread of `values`; all zero for none.
    pub fn of(values: &[f64]) -> Spread {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return Spread::range(0.0, 0.0, 0.0);
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mid = n / 2;
        let median = if !n.is_multiple_of(2) {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        // The k-th smallest and k-th largest value bound the median with probability
        // 1 − 2·P(Binomial(n, ½) < k); take the tightest pair that keeps it ≥ 95 %.
        let (low, high) = match median_interval_rank(n) {
            Some(k) => (sorted[k - 1], sorted[n - k]),
            None => (sorted[0], sorted[n - 1]),
        };
        Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            low,
            high,
        }
    }

    /// A spread known only by its median and range (no values to bound the median with).
    pub fn range(median: f64, min: f64, max: f64) -> Spread {
        Spread {
            median,
            min,
            max,
            low: min,
            high: max,
        }
    }

    /// Whether the 95 % interval is tighter than the range (there were enough values).
    pub fn has_interval(&self) -> bool {
        self.low > self.min || self.high < self.max
    }

    pub fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max,
               "median_interval_95": [self.low, self.high]})
    }

    /// `median (min–max)` with `decimals` digits; thousands separated when 0.
    pub fn cell(&self, decimals: usize) -> String {
        let f = |v: f64| {
            if decimals == 0 {
                thousands(v.round() as u64)
            } else {
                format!("{v:.decimals$}")
            }
        };
        format!("{} ({}–{})", f(self.median), f(self.min), f(self.max))
    }
}

/// The largest k with P(Binomial(n, ½) ≤ k − 1) ≤ 2.5 %: the rank of the order
/// statistics that bound the median with at least 95 % confidence. `None` below six
/// values, where even the smallest and largest bound it with less (93.75 % for five).
pub fn median_interval_rank(n: usize) -> Option<usize> {
    // P(B ≤ j) for j = 0, 1, …, summed in floating point: n stays in the tens.
    let mut below = 0.0; // P(B ≤ k − 1) for the k tried next
    let mut term = 0.5f64.powi(n as i32); // P(B = 0)
    let mut best = None;
    for k in 1..=n / 2 {
        below += term; // now P(B ≤ k − 1)
        if below > 0.025 {
            break;
        }
        best = Some(k);
        term *= (n - (k - 1)) as f64 / k as f64; // P(B = k)
    }
    best
}

/// The `--instructions` table: per row, Envoy's instructions per request, and what each
/// row does over the baseline row (`baseline`: the empty filter, or the probe making no
/// call) and per it, round by round. With `calls` > 1 (the host-call probes), the extra
/// instructions are also given per call.
pub fn instructions_table(
    counted: &[crate::instructions::Counted],
    baseline: &str,
    calls: u32,
) -> String {
    let empty = match counted.iter().find(|c| c.setup.id == baseline) {
        Some(empty) => empty,
        // Without the baseline row (left out with --rows) there is nothing to compare:
        // the counts alone.
        None => {
            let mut out = String::from(
                "| row | configuration | Envoy instructions per request |\n|---|---|---|\n",
            );
            for c in counted {
                out.push_str(&format!(
                    "| {} | {} | {} |\n",
                    c.setup.row,
                    c.setup.title,
                    Spread::of(&c.per_request).cell(0)
                ));
            }
            return out;
        }
    };
    let base_row = empty.setup.row.as_str();
    let mut out = format!(
        "| row | configuration | Envoy instructions per request | over row {base_row} |{} × row {base_row} | row {base_row} ÷ row (requests/s bound) |\n|---|---|---|---|{}---|---|\n",
        if calls > 1 { " per call |" } else { "" },
        if calls > 1 { "---|" } else { "" },
    );
    for c in counted {
        let per_round = |f: &dyn Fn(f64, f64) -> f64| -> Spread {
            let values: Vec<f64> = c
                .per_request
                .iter()
                .zip(&empty.per_request)
                .map(|(row, empty)| f(*row, *empty))
                .collect();
            Spread::of(&values)
        };
        let per_call = if calls > 1 {
            let n = f64::from(calls);
            format!(" {} |", signed(per_round(&|row, empty| (row - empty) / n)))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} |{} {} | {} |\n",
            c.setup.row,
            c.setup.title,
            Spread::of(&c.per_request).cell(0),
            signed(per_round(&|row, empty| row - empty)),
            per_call,
            per_round(&|row, empty| row / empty).cell(3),
            per_round(&|row, empty| empty / row).cell(3),
        ));
    }
    out
}

/// `--instructions --cache-sim`: what the instruction count leaves out, per request —
/// callgrind's simulated cache misses and mispredicted branches (median over the rounds).
pub fn cache_table(counted: &[crate::instructions::Counted]) -> String {
    let mut out = String::from(
        "Simulated by callgrind, per request (median over the rounds): instruction-cache misses \
         (first level, last level), data-cache misses (first level, last level; reads + writes), \
         mispredicted branches (conditional + indirect).\n\n\
         | row | configuration | I1 misses | LL instruction misses | D1 misses | LL data misses | mispredicted branches |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for c in counted {
        let event = |names: &[&str]| {
            let values: Vec<f64> = c
                .events
                .iter()
                .map(|round| {
                    round
                        .iter()
                        .filter(|(name, _)| names.contains(&name.as_str()))
                        .map(|(_, v)| v)
                        .sum()
                })
                .collect();
            if values.is_empty() {
                "—".to_string()
            } else {
                Spread::of(&values).cell(0)
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            c.setup.row,
            c.setup.title,
            event(&["I1mr"]),
            event(&["ILmr"]),
            event(&["D1mr", "D1mw"]),
            event(&["DLmr", "DLmw"]),
            event(&["Bcm", "Bim"]),
        ));
    }
    out
}

/// A spread of differences, each with its sign.
fn signed(spread: Spread) -> String {
    let f = |v: f64| {
        let text = thousands(v.abs().round() as u64);
        if v < -0.5 {
            format!("−{text}")
        } else {
            format!("+{text}")
        }
    };
    format!("{} ({}–{})", f(spread.median), f(spread.min), f(spread.max))
}

/// Writes `value` as pretty JSON to `path`, creating its directory.
pub fn write_json(path: &std::path::Path, value: &Value) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Everything measured for one configuration.
pub struct Measured {
    pub setup: Setup,
    /// One wrk run per round, in round order.
    pub runs: Vec<Run>,
    /// Envoy's resident memory after the load, KiB.
    pub rss_kib: Option<u64>,
    /// Counters read after the load (the filter's decisions, shadow copies).
    pub counters: Vec<(String, u64)>,
}

impl Measured {
    /// The spread of one value over the rounds (rounds without it left out).
    fn over_rounds(&self, value: impl Fn(&Run) -> Option<f64>) -> Spread {
        Spread::of(&self.runs.iter().filter_map(value).collect::<Vec<_>>())
    }

    pub fn rps(&self) -> Spread {
        self.over_rounds(|r| Some(r.rps()))
    }

    pub fn p50_ms(&self) -> Spread {
        self.over_rounds(|r| Some(r.p50_us as f64 / 1e3))
    }

    pub fn p99_ms(&self) -> Spread {
        self.over_rounds(|r| Some(r.p99_us as f64 / 1e3))
    }

    /// Envoy's CPU time per request, µs.
    pub fn cpu_us(&self) -> Spread {
        self.over_rounds(Run::cpu_us_per_request)
    }

    /// Requests that failed (socket errors, timeouts, non-2xx/3xx answers), all rounds.
    pub fn failed(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| r.socket_errors + r.status_errors)
            .sum()
    }

    /// Per-round ratio of this configuration's `metric` to `other`'s, measured in the
    /// same round (neighbours in time, so machine drift mostly cancels).
    pub fn ratio(&self, other: &Measured, metric: impl Fn(&Run) -> f64) -> Spread {
        self.per_round_with(other, |a, b| metric(a) / metric(b))
    }

    /// Per-round difference of this configuration's `metric` and `other`'s.
    pub fn difference(&self, other: &Measured, metric: impl Fn(&Run) -> f64) -> Spread {
        self.per_round_with(other, |a, b| metric(a) - metric(b))
    }

    /// `combine` of this configuration's run and `other`'s, round by round.
    pub fn per_round_with(&self, other: &Measured, combine: impl Fn(&Run, &Run) -> f64) -> Spread {
        let values: Vec<f64> = self
            .runs
            .iter()
            .zip(&other.runs)
            .map(|(a, b)| combine(a, b))
            .collect();
        Spread::of(&values)
    }
}

/// One of the targets.
pub struct Target {
    pub name: &'static str,
    /// The measured value (a median over the rounds, for a ratio).
    pub value: f64,
    pub limit: f64,
    /// True when `value` must be at least `limit` (false: at most).
    pub at_least: bool,
    pub unit: &'static str,
    /// For a value measured once per round: its spread over the rounds. When the limit
    /// lies inside the median's 95 % interval (with five rounds: inside the range) the
    /// verdict is not decisive — this machine's noise decides it.
    pub per_round: Option<Spread>,
}

impl Target {
    pub fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.limit
        } else {
            self.value <= self.limit
        }
    }

    /// Whether the median's 95 % interval lies on one side of the limit — with too few
    /// rounds for one, whether every round did (true when there are no rounds).
    pub fn decisive(&self) -> bool {
        !self
            .per_round
            .as_ref()
            .is_some_and(|r| r.low < self.limit && self.limit < r.high)
    }

    pub fn json(&self) -> Value {
        let mut record = json!({
            "name": self.name, "value": self.value, "limit": self.limit,
            "at_least": self.at_least, "unit": self.unit, "met": self.met(),
            "decisive": self.decisive(),
        });
        if let Some(r) = &self.per_round {
            record["per_round_min"] = json!(r.min);
            record["per_round_max"] = json!(r.max);
            record["median_interval_95"] = json!([r.low, r.high]);
        }
        record
    }

    pub fn line(&self) -> String {
        let rounds = match &self.per_round {
            Some(r) => format!(
                "; per round {:.3}–{:.3}{}{}",
                r.min,
                r.max,
                if r.has_interval() {
                    format!(", the median's 95 % interval {:.3}–{:.3}", r.low, r.high)
                } else {
                    String::new()
                },
                if self.decisive() {
                    ""
                } else {
                    ", the limit inside it"
                }
            ),
            None => String::new(),
        };
        format!(
            "{:<6} {}: {:.3}{} ({} {}{}{})",
            if self.met() { "MET" } else { "MISSED" },
            self.name,
            self.value,
            self.unit,
            if self.at_least { "≥" } else { "≤" },
            self.limit,
            self.unit,
            rounds
        )
    }
}

/// The throughput table (rows 1–5) as Markdown.
pub fn throughput_table(all: &[Measured], native: &Measured, empty: &Measured) -> String {
    let mut out = String::from(
        "| row | configuration | requests/s | p50 ms | p99 ms | × row 1 | × row 2 | Envoy CPU µs/request |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for m in all.iter().filter(|m| m.setup.family == Family::Throughput) {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m.setup.row,
            m.setup.title,
            m.rps().cell(0),
            m.p50_ms().cell(2),
            m.p99_ms().cell(2),
            m.ratio(native, Run::rps).cell(2),
            m.ratio(empty, Run::rps).cell(2),
            m.cpu_us().cell(1),
        );
    }
    out
}

/// `--compare`'s table: every module against the empty filter, and against the first
/// module (the one being compared with), in the same rounds.
pub fn compare_table(all: &[Measured], empty: &Measured, first: &Measured) -> String {
    let mut out = String::from(
        "| row | configuration | requests/s | × row 2 | × row 3.1 | Envoy CPU µs/request | RSS MiB |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for m in all {
        let rss = m
            .rss_kib
            .map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0));
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            m.setup.row,
            m.setup.title,
            m.rps().cell(0),
            m.ratio(empty, Run::rps).cell(3),
            m.ratio(first, Run::rps).cell(3),
            m.cpu_us().cell(2),
            rss,
        );
    }
    out
}

/// The latency table (rows 4b, 4c, 5b, 5c) as Markdown; each row's percentiles are
/// compared with its baseline's in the same round (4c with 4b, 5c with 5b).
pub fn latency_table(all: &[Measured]) -> String {
    let mut out = String::from(
        "| row | configuration | requests/s | p50 ms | p99 ms | p50 × no-mirror row | p99 × no-mirror row | Envoy CPU µs/request |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for m in all.iter().filter(|m| m.setup.family == Family::Latency) {
        let baseline = all
            .iter()
            .find(|b| b.setup.id == m.setup.baseline)
            .unwrap_or(m);
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m.setup.row,
            m.setup.title,
            m.rps().cell(0),
            m.p50_ms().cell(2),
            m.p99_ms().cell(2),
            m.ratio(baseline, |r| r.p50_us as f64).cell(3),
            m.ratio(baseline, |r| r.p99_us as f64).cell(3),
            m.cpu_us().cell(1),
        );
    }
    out
}

/// The microbenchmark as Markdown.
pub fn micro_table(timings: &[Timing]) -> String {
    let mut out = String::from("| decision | ns per decision |\n|---|---|\n");
    for t in timings {
        let spread = Spread::range(t.ns[0], t.ns[1], t.ns[2]);
        out += &format!("| {} | {} |\n", t.title, spread.cell(1));
    }
    out
}

/// The JSON record of one configuration.
pub fn measured_json(m: &Measured, native: &Measured, empty: &Measured) -> Value {
    let runs: Vec<Value> = m
        .runs
        .iter()
        .map(|r| {
            json!({
                "requests": r.requests, "duration_us": r.duration_us, "rps": r.rps(),
                "p50_us": r.p50_us, "p99_us": r.p99_us,
                "socket_errors": r.socket_errors, "status_errors": r.status_errors,
                "envoy_cpu_s": r.envoy_cpu_s,
            })
        })
        .collect();
    let counters: serde_json::Map<String, Value> = m
        .counters
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "id": m.setup.id,
        "row": m.setup.row,
        "title": m.setup.title,
        "family": match m.setup.family { Family::Throughput => "throughput", Family::Latency => "latency" },
        "rps": m.rps().json(),
        "p50_ms": m.p50_ms().json(),
        "p99_ms": m.p99_ms().json(),
        "baseline": m.setup.baseline,
        "envoy_cpu_us_per_request": m.cpu_us().json(),
        "rps_ratio_to_native": m.ratio(native, Run::rps).json(),
        "rps_ratio_to_empty_wasm": m.ratio(empty, Run::rps).json(),
        "failed_requests": m.failed(),
        "rss_kib": m.rss_kib,
        "counters": counters,
        "runs": runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median, 2.5);
        assert_eq!(Spread::of(&[]).median, 0.0);
    }

    #[test]
    fn a_target_says_when_the_rounds_straddle_its_limit() {
        let target = |min: f64, median: f64, max: f64| Target {
            name: "ratio",
            value: median,
            limit: 0.85,
            at_least: true,
            unit: "",
            per_round: Some(Spread::range(median, min, max)),
        };
        let straddling = target(0.73, 0.84, 0.87);
        assert!(!straddling.met() && !straddling.decisive());
        assert!(straddling.line().starts_with("MISSED"));
        assert!(straddling
            .line()
            .contains("per round 0.730–0.870, the limit inside it"));
        assert_eq!(straddling.json()["decisive"], false);
        let clear = target(0.86, 0.9, 0.95);
        assert!(clear.met() && clear.decisive());
        assert!(!clear.line().contains("inside"));
        assert_eq!(clear.json()["per_round_min"], 0.86);
        let once = Target {
            per_round: None,
            ..target(0.0, 0.9, 0.0)
        };
        assert!(once.decisive());
        assert!(!once.line().contains("per round"));
    }

    #[test]
    fn the_median_interval_uses_binomial_ranks() {
        // P(Binomial(n, ½) ≤ k − 1) ≤ 2.5 % < P(… ≤ k), from the binomial table.
        for (n, k) in [
            (5, None),
            (6, Some(1)),
            (10, Some(2)),
            (20, Some(6)),
            (40, Some(14)),
        ] {
            assert_eq!(median_interval_rank(n), k, "n = {n}");
        }
        let values: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        let s = Spread::of(&values);
        assert_eq!(
            (s.min, s.low, s.median, s.high, s.max),
            (1.0, 6.0, 10.5, 15.0, 20.0)
        );
        assert!(s.has_interval());
        let five = Spread::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((five.low, five.high), (1.0, 5.0));
        assert!(!five.has_interval());
    }

    #[test]
    fn enough_rounds_decide_a_target_whose_range_straddles_the_limit() {
        // Twenty rounds, two of them above the limit: the range straddles it, the
        // median's interval (the 6th to the 15th value) does not.
        let mut values: Vec<f64> = (0..18).map(|i| 0.80 + 0.01 * f64::from(i)).collect();
        values.extend([1.05, 1.10]);
        let target = |values: &[f64]| Target {
            name: "p99 ratio",
            value: Spread::of(values).median,
            limit: 1.0,
            at_least: false,
            unit: "",
            per_round: Some(Spread::of(values)),
        };
        let decided = target(&values);
        assert!(decided.met() && decided.decisive());
        assert!(decided
            .line()
            .contains("per round 0.800–1.100, the median's 95 % interval 0.850–0.940"));
        assert!(!decided.line().contains("inside"));
        // The same shape around the limit: undecided.
        let around: Vec<f64> = values.iter().map(|v| v + 0.12).collect();
        let undecided = target(&around);
        assert!(!undecided.decisive());
        assert!(undecided.line().ends_with("the limit inside it)"));
        assert_eq!(undecided.json()["decisive"], false);
    }

    #[test]
    fn the_instructions_table_compares_with_its_baseline_row_when_it_was_counted() {
        let counted = |id: &str, row: &str, per_request: Vec<f64>| crate::instructions::Counted {
            setup: Setup {
                id: id.into(),
                row: row.into(),
                title: format!("row {row}"),
                family: Family::Throughput,
                bootstrap: Value::Null,
                baseline: id.into(),
            },
            per_request,
            events: Vec::new(),
        };
        let rows = [
            counted("empty_wasm", "2", vec![100_000.0, 100_200.0]),
            counted("meshcanary", "3", vec![125_000.0, 125_200.0]),
        ];
        let table = instructions_table(&rows, "empty_wasm", 1);
        assert!(table
            .starts_with("| row | configuration | Envoy instructions per request | over row 2 |"));
        assert!(table.contains("| 3 | row 3 | 125,100 (125,000–125,200) | +25,000 (+25,000–+25,000) | 1.250 (1.250–1.250) | 0.800 (0.800–0.800) |"), "{table}");
        // Without the baseline (`--rows 3`): the counts alone, no column to fill with guesses.
        let alone = instructions_table(&rows[1..], "empty_wasm", 1);
        assert_eq!(
            alone,
            "| row | configuration | Envoy instructions per request |\n|---|---|---|\n\
             | 3 | row 3 | 125,100 (125,000–125,200) |\n"
        );
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
