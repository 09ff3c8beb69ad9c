//! `make demo` works: the demo program, end to end, in its `--fast` pace — real Envoy,
//! real upstream and load processes, the real controller — exits 0 with one promotion
//! and one rollback in its summary, and leaves nothing running.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshcanary_e2e::paths;
use tokio::process::Command;

/// The demo's own deadline in this test; the test waits a little longer before killing it.
const DEADLINE_S: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_promotes_a_healthy_canary_and_rolls_back_a_faulty_one() {
    let meshcanary = paths::meshcanary_bin();
    assert!(
        meshcanary.exists(),
        "{} not found: build it with `cargo build -p meshcanary` (make test does)",
        meshcanary.display()
    );
    let started = Instant::now();
    let reports = tempfile::tempdir().expect("temp dir");
    let child = Command::new(env!("CARGO_BIN_EXE_meshcanary-demo"))
        .arg("--fast")
        .arg("--meshcanary")
        .arg(&meshcanary)
        .args(["--deadline-s", &DEADLINE_S.to_string()])
        .arg("--report-dir")
        .arg(reports.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start meshcanary-demo");
    let output = tokio::time::timeout(
        Duration::from_secs(DEADLINE_S + 20),
        child.wait_with_output(),
    )
    .await
    .expect("the demo ends by its own deadline")
    .expect("demo output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let transcript = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    println!("demo took {:?}", started.elapsed());
    assert_eq!(output.status.code(), Some(0), "{transcript}");

    // The summary's first table: one row per rollout.
    let summary = stdout
        .split_once("\nsummary\n")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no summary\n{transcript}"));
    let row = |label: &str| {
        summary
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} row\n{transcript}"))
            .to_string()
    };
    let healthy = row("healthy");
    assert!(
        healthy.contains("promoted") && healthy.contains("20 → 50 → 100"),
        "{healthy}\n{transcript}"
    );
    let faulty = row("faulty");
    assert!(
        faulty.contains("rolled back") && faulty.trim_end().contains(" → 0"),
        "{faulty}\n{transcript}"
    );
    assert!(!faulty.contains("100"), "never promoted: {faulty}");
    // Rows of the verdict table: a rollout's label, then the verdict.
    let verdicts = |kind: &str| {
        summary
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|w| w.len() > 1 && ["healthy", "faulty"].contains(&w[0]) && w[1] == kind)
            .count()
    };
    assert_eq!(verdicts("complete"), 1, "one promotion to 100 %\n{summary}");
    assert_eq!(verdicts("rollback"), 1, "one rollback\n{summary}");
    for expected in ["detection", "time to rollback", "load generator"] {
        assert!(summary.contains(expected), "{expected}\n{summary}");
    }
    assert!(
        summary.contains("0 requests reached the canary"),
        "nothing reaches the canary after the rollback\n{summary}"
    );

    // One report page per rollout, each path printed; their plots are checked in a real
    // browser by tests/report.rs.
    for label in ["healthy", "faulty"] {
        let page = reports.path().join(format!("{label}-report.html"));
        assert!(
            stdout.contains(&format!("{}", page.display())),
            "{label}: report path printed\n{stdout}"
        );
        let html = std::fs::read_to_string(&page).expect("report written");
        assert_eq!(
            html.matches("<svg class=\"plot\"").count(),
            4,
            "{label}: four plots"
        );
    }

    // Everything it started is gone: nothing answers on the ports it announced.
    let announced: Vec<SocketAddr> = stdout
        .lines()
        .take_while(|l| !l.starts_with("  spec"))
        .flat_map(|l| l.split([' ', ',']))
        .filter_map(|word| word.parse().ok())
        .collect();
    assert!(
        announced.len() >= 4,
        "listener, admin and both upstreams announced: {announced:?}\n{stdout}"
    );
    for addr in announced {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts connections after the demo ended"
        );
    }
}
