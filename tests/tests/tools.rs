//! The demo's and the controller tests' helper programs, run as real processes:
//! `meshcanary-upstream` (errors, latency, run-time control) and `meshcanary-load`
//! (bounds, pacing, headers, the loopback-only rule).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshcanary_e2e::Upstream;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const UPSTREAM: &str = env!("CARGO_BIN_EXE_meshcanary-upstream");
const LOAD: &str = env!("CARGO_BIN_EXE_meshcanary-load");

/// A running `meshcanary-upstream`; killed when dropped.
struct Program {
    addr: SocketAddr,
    _child: Child,
}

impl Program {
    /// Starts it on port 0 and learns the port from its first stdout line.
    async fn start(args: &[&str]) -> Program {
        let mut child = Command::new(UPSTREAM)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start meshcanary-upstream");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut first = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(stdout).read_line(&mut first),
        )
        .await
        .expect("first line within 10 s")
        .expect("read stdout");
        let addr = first
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("first line is `listening ADDR`: {first:?}"))
            .parse()
            .expect("an address");
        Program {
            addr,
            _child: child,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stats(&self) -> Value {
        reqwest::get(self.url("/_stats"))
            .await
            .expect("GET /_stats")
            .json()
            .await
            .expect("stats are JSON")
    }

    /// `PUT /_control?query`; returns the status and body.
    async fn control(&self, query: &str) -> (u16, String) {
        let response = reqwest::Client::new()
            .put(self.url(&format!("/_control?{query}")))
            .send()
            .await
            .expect("PUT /_control");
        let status = response.status().as_u16();
        (status, response.text().await.expect("control body"))
    }

    /// Statuses of `n` sequential GETs.
    async fn statuses(&self, n: usize) -> Vec<u16> {
        let client = reqwest::Client::new();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let response = client.get(self.url("/")).send().await.expect("GET /");
            out.push(response.status().as_u16());
        }
        out
    }
}

/// What one `meshcanary-load` run left: exit code, its summary (if any) and stderr.
struct LoadRun {
    code: Option<i32>,
    summary: Value,
    stderr: String,
    took: Duration,
}

async fn load(args: &[&str]) -> LoadRun {
    let began = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(LOAD).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("meshcanary-load stops by itself")
    .expect("run meshcanary-load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    LoadRun {
        code: output.status.code(),
        summary: stdout
            .lines()
            .last()
            .map(|line| serde_json::from_str(line).expect("the summary line is JSON"))
            .unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: began.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_is_exact_over_1000_requests() {
    let upstream = Program::start(&["--name", "canary", "--error-rate", "0.5"]).await;
    let url = upstream.url("/");
    let run = load(&[
        "--url",
        &url,
        "--rps",
        "0",
        "--max-requests",
        "1000",
        "--concurrency",
        "16",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // Deterministic spreading: exactly half, not merely about half.
    assert_eq!(run.summary["sent"], 1000);
    assert_eq!(run.summary["errors"], 0);
    assert_eq!(run.summary["by_class"], json!({"2xx": 500, "5xx": 500}));
    assert_eq!(
        run.summary["by_upstream"],
        json!({"canary": {"2xx": 500, "5xx": 500}})
    );
    let stats = upstream.stats().await;
    assert_eq!(stats["requests"], 1000);
    assert_eq!(stats["by_status"], json!({"200": 500, "500": 500}));
    assert_eq!(stats["name"], "canary");

    // A rate changed at run time holds over the next requests too.
    assert_eq!(upstream.control("error_rate=0.1").await.0, 204);
    let statuses = upstream.statuses(100).await;
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_and_slow_share_are_honoured() {
    let upstream = Program::start(&[
        "--latency-ms",
        "50",
        "--slow-rate",
        "0.5",
        "--slow-ms",
        "300",
    ])
    .await;
    let url = upstream.url("/");
    let run = load(&[
        "--url",
        &url,
        "--rps",
        "0",
        "--max-requests",
        "10",
        "--concurrency",
        "1",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.summary["completed"], 10);
    let p50 = run.summary["latency_ms"]["p50"].as_f64().expect("p50");
    let max = run.summary["latency_ms"]["max"].as_f64().expect("max");
    // Nearest rank over 5 fast and 5 slow answers: p50 is the slowest fast one.
    assert!((50.0..300.0).contains(&p50), "p50 {p50} ms");
    assert!(max >= 300.0, "max {max} ms");
    assert_eq!(upstream.stats().await["slow"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_endpoint_changes_behaviour_and_is_not_traffic() {
    let upstream = Program::start(&["--name", "stable"]).await;
    assert_eq!(upstream.statuses(5).await, vec![200; 5]);

    assert_eq!(upstream.control("error_rate=1").await, (204, String::new()));
    assert_eq!(upstream.statuses(5).await, vec![500; 5]);

    assert_eq!(
        upstream
            .control("error_rate=0&status=203&latency_ms=100")
            .await
            .0,
        204
    );
    let began = Instant::now();
    assert_eq!(upstream.statuses(2).await, vec![203; 2]);
    assert!(began.elapsed() >= Duration::from_millis(200));

    // All or nothing: a bad pair names itself and changes nothing, not even `status`.
    let (status, body) = upstream.control("status=201&error_rate=1.5").await;
    assert_eq!(status, 400);
    assert!(body.contains("error_rate"), "{body}");
    assert_eq!(upstream.control("colour=blue").await.0, 400);

    let stats = upstream.stats().await;
    assert_eq!(
        stats["requests"], 12,
        "control and stats requests are not counted"
    );
    assert_eq!(stats["by_status"], json!({"200": 5, "203": 2, "500": 5}));
    assert_eq!(stats["behaviour"]["status"], 203);
    assert_eq!(stats["behaviour"]["latency_ms"], 100);

    let reset = reqwest::Client::new()
        .delete(upstream.url("/_stats"))
        .send()
        .await
        .expect("DELETE /_stats");
    assert_eq!(reset.status().as_u16(), 204);
    assert_eq!(upstream.stats().await["requests"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refuses_to_listen_off_loopback() {
    let output = Command::new(UPSTREAM)
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .await
        .expect("run meshcanary-upstream");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("127.0.0.0/8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_stops_at_max_requests() {
    let upstream = Program::start(&[]).await;
    let url = upstream.url("/");
    let run = load(&[
        "--url",
        &url,
        "--rps",
        "0",
        "--max-requests",
        "37",
        "--duration-s",
        "30",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.summary["sent"], 37);
    assert_eq!(run.summary["completed"], 37);
    assert!(run.took < Duration::from_secs(10), "took {:?}", run.took);
    assert_eq!(upstream.stats().await["requests"], 37);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_stops_at_duration_and_holds_the_rate() {
    let upstream = Program::start(&[]).await;
    let url = upstream.url("/");
    let run = load(&[
        "--url",
        &url,
        "--rps",
        "20",
        "--duration-s",
        "1",
        "--max-requests",
        "100000",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // Request k is due at k / 20 s, so k = 0..19 start inside the second (a few late
    // ones may miss it on a busy machine; never more than 20).
    let sent = run.summary["sent"].as_u64().expect("sent");
    assert!((15..=20).contains(&sent), "sent {sent}");
    assert!(
        run.took >= Duration::from_millis(950) && run.took < Duration::from_secs(3),
        "took {:?}",
        run.took
    );
    assert_eq!(upstream.stats().await["requests"], sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_sends_headers_and_cycles_user_ids() {
    // The in-process upstream records every request, headers included.
    let upstream = Upstream::start("stable").await;
    let url = format!("http://{}/", upstream.addr);
    let run = load(&[
        "--url",
        &url,
        "--rps",
        "0",
        "--max-requests",
        "21",
        "--user-ids",
        "7",
        "--header",
        "x-env: demo",
        "--header",
        "x-canary:always",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.summary["by_upstream"], json!({"stable": {"2xx": 21}}));
    let mut users = BTreeMap::new();
    for request in upstream.requests() {
        assert_eq!(request.header("x-env").as_deref(), Some("demo"));
        assert_eq!(request.header("x-canary").as_deref(), Some("always"));
        *users
            .entry(request.header("x-user-id").expect("x-user-id"))
            .or_insert(0) += 1;
    }
    let expected: BTreeMap<String, i32> = (0..7).map(|k| (format!("user-{k}"), 3)).collect();
    assert_eq!(users, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_counts_requests_nobody_answered() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address");
    // The listener is gone: connections to it are refused.
    let url = format!("http://{closed}/");
    let run = load(&["--url", &url, "--rps", "0", "--max-requests", "5"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.summary["errors"], 5);
    assert_eq!(run.summary["completed"], 0);
    let first_error = run.summary["first_error"].as_str().expect("first_error");
    assert!(first_error.contains("refused"), "{first_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_refuses_anything_but_127_0_0_0_8() {
    for url in [
        "http://10.0.0.1/",
        "http://192.168.1.1:8080/",
        "http://localhost:8080/",
        "http://[::1]:8080/",
        "http://example.com/",
        "https://127.0.0.1/",
    ] {
        let run = load(&["--url", url, "--max-requests", "1"]).await;
        assert_eq!(run.code, Some(2), "{url}: {}", run.stderr);
        assert_eq!(run.summary, Value::Null, "{url}: nothing was sent");
        assert!(
            run.stderr.contains("127.0.0.0/8") || run.stderr.contains("only http://"),
            "{url}: {}",
            run.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_ended_by_sigterm_still_prints_its_totals() {
    use meshcanary_e2e::programs::LoadProgram;
    let upstream = Upstream::start("stable").await;
    let args: Vec<String> = [
        "--url",
        &format!("http://{}/", upstream.addr),
        "--rps",
        "50",
        "--duration-s",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let load = LoadProgram::start(std::path::Path::new(LOAD), &args).expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = Instant::now();
    let summary = load
        .stop(Duration::from_secs(10))
        .await
        .expect("a summary after SIGTERM");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?}",
        asked.elapsed()
    );
    assert_eq!(summary["stopped_by_signal"], true, "{summary}");
    // About a second at 50/s: the program may start late, and the signal arrive late,
    // on a busy machine.
    let sent = summary["sent"].as_u64().expect("sent");
    assert!(
        (30..=80).contains(&sent),
        "about a second at 50/s: {summary}"
    );
    assert_eq!(summary["completed"], sent);
    assert_eq!(upstream.count() as u64, sent);
}
