//! Runs wrk (the load generator, from Debian) against one Envoy and reads back the
//! summary line `requests.lua` prints when wrk finishes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

/// wrk threads: one, so wrk and Envoy's single worker each get a core of a small machine.
pub const THREADS: u32 = 1;

/// A request wrk gives up on after this long (counted as a timeout).
const REQUEST_TIMEOUT_S: u32 = 5;

/// How long past its `-d` a wrk run may take before it is killed.
const GRACE: Duration = Duration::from_secs(20);

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Requests completed.
    pub requests: u64,
    /// Wall time of the run, µs.
    pub duration_us: u64,
    /// Socket errors and timeouts (connect, read, write, timeout).
    pub socket_errors: u64,
    /// Answers that were not 2xx/3xx.
    pub status_errors: u64,
    /// Latency percentiles, µs.
    pub p50_us: u64,
    pub p99_us: u64,
    /// CPU time Envoy (all its threads) used during the run, seconds; `None` when it
    /// could not be read.
    pub envoy_cpu_s: Option<f64>,
}

impl Run {
    /// Completed requests per second.
    pub fn rps(&self) -> f64 {
        if self.duration_us == 0 {
            return 0.0;
        }
        self.requests as f64 * 1e6 / self.duration_us as f64
    }

    /// Envoy's CPU time per completed request, µs (what the filter costs, independent of
    /// whether Envoy or wrk was the bottleneck).
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.envoy_cpu_s?;
        (self.requests > 0).then(|| cpu * 1e6 / self.requests as f64)
    }
}

/// User + system CPU time of process `pid` so far, seconds (`/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized command name: state is the 1st, utime the 12th,
    // stime the 13th, in clock ticks (USER_HZ, 100 on Linux).
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// wrk's version line (`wrk debian/4.1.0-3+b2 [epoll] …`), or an error naming the fix.
pub async fn version() -> Result<String, String> {
    // `wrk -v` prints its version and exits non-zero; only the text matters.
    let output = Command::new("wrk")
        .arg("-v")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run wrk ({e}): apt-get install wrk (make bench does)"))?;
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    let line = text.lines().next().unwrap_or_default();
    let version = line.split(" Copyright").next().unwrap_or(line).trim();
    if version.starts_with("wrk") {
        Ok(version.to_string())
    } else {
        Err(format!("wrk -v printed {text:?}; is it wrk?"))
    }
}

/// Sends the request mix of `script` to `target` for `duration` over `connections`
/// keep-alive connections, reading the CPU time of process `envoy` around it. Only
/// loopback targets are accepted.
pub async fn run(
    script: &Path,
    target: SocketAddr,
    envoy: Option<u32>,
    connections: u32,
    duration: Duration,
) -> Result<Run, String> {
    if !target.ip().is_loopback() {
        return Err(format!("{target}: wrk may only target 127.0.0.0/8"));
    }
    let seconds = duration.as_secs().max(1);
    let cpu_before = envoy.and_then(cpu_seconds);
    let child = Command::new("wrk")
        .arg(format!("-t{THREADS}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg(format!("--timeout={REQUEST_TIMEOUT_S}s"))
        .arg("-s")
        .arg(script)
        .arg(format!("http://{target}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start wrk: {e}"))?;
    // On timeout the future (and with it the child) is dropped, which kills wrk.
    let output = tokio::time::timeout(
        Duration::from_secs(seconds) + GRACE,
        child.wait_with_output(),
    )
    .await
    .map_err(|_| format!("wrk against {target} did not finish in {seconds} s + {GRACE:?}"))?
    .map_err(|e| format!("wrk: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "wrk exited with {}: {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let cpu_after = envoy.and_then(cpu_seconds);
    let mut run =
        parse(&stdout).ok_or_else(|| format!("no summary line in wrk's output:\n{stdout}"))?;
    run.envoy_cpu_s = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
    Ok(run)
}

/// Reads the `meshcanary-bench {…}` line out of wrk's output.
fn parse(stdout: &str) -> Option<Run> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("meshcanary-bench "))?;
    let v: Value = serde_json::from_str(line).ok()?;
    let n = |key: &str| v[key].as_u64();
    Some(Run {
        requests: n("requests")?,
        duration_us: n("duration_us")?,
        socket_errors: n("connect_errors")?
            + n("read_errors")?
            + n("write_errors")?
            + n("timeouts")?,
        status_errors: n("status_errors")?,
        p50_us: n("p50_us")?,
        p99_us: n("p99_us")?,
        envoy_cpu_s: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary_line() {
        let out = "Running 1s test @ http://127.0.0.1:1/\n  1 threads and 8 connections\n\
                   meshcanary-bench {\"requests\":200,\"duration_us\":1000000,\"connect_errors\":0,\
                   \"read_errors\":1,\"write_errors\":0,\"status_errors\":2,\"timeouts\":3,\
                   \"p50_us\":120,\"p99_us\":900,\"max_us\":1500}\n";
        let run = parse(out).expect("parsed");
        assert_eq!(run.requests, 200);
        assert_eq!(run.socket_errors, 4);
        assert_eq!(run.status_errors, 2);
        assert_eq!((run.p50_us, run.p99_us), (120, 900));
        assert!((run.rps() - 200.0).abs() < 1e-9);
        assert_eq!(run.cpu_us_per_request(), None);
        let measured = Run {
            envoy_cpu_s: Some(0.5),
            ..run
        };
        assert_eq!(measured.cpu_us_per_request(), Some(2500.0));
        assert!(parse("no line here").is_none());
    }
}
