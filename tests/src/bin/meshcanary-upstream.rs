//! `meshcanary-upstream`: the test upstream as a program, for the demo and for tests that
//! need a separate process. It answers every request with its name (in the `x-upstream`
//! header and the body), fails or slows down a set share of requests, and takes new
//! settings at run time:
//!
//! ```text
//! meshcanary-upstream --name canary --error-rate 0.5 --latency-ms 10
//! curl -X PUT 'http://127.0.0.1:PORT/_control?error_rate=0&slow_rate=0.1&slow_ms=800'
//! curl http://127.0.0.1:PORT/_stats
//! ```
//!
//! Its first stdout line is `listening ADDR`, so a caller can pass port 0 and learn the
//! port. It runs until it is killed.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use meshcanary_e2e::upstream::{parse_rate, parse_status};
use meshcanary_e2e::{Behaviour, Options, Upstream};

/// HTTP/1.1 upstream on loopback with a configurable share of errors and slow answers.
///
/// Failures and slow answers are deterministic, spread evenly over arrival order:
/// at --error-rate 0.5 exactly every second request fails. Change the settings at run
/// time with `PUT /_control?error_rate=F&latency_ms=N&slow_rate=F&slow_ms=N&status=N`
/// (keys left out keep their value; answered 204), read the counts with `GET /_stats`,
/// zero them with `DELETE /_stats`. Those requests are never counted as traffic.
#[derive(Debug, Parser)]
#[command(name = "meshcanary-upstream", version)]
struct Args {
    /// Address to listen on, in 127.0.0.0/8; port 0 lets the kernel choose.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Name sent back in the `x-upstream` header and as the body.
    #[arg(long, default_value = "upstream")]
    name: String,
    /// Status of the answers that do not fail.
    #[arg(long, default_value_t = 200, value_parser = parse_status)]
    status: u16,
    /// Share of requests (0.0–1.0) answered 500.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    error_rate: f64,
    /// Wait this long before answering.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of requests (0.0–1.0) that wait --slow-ms instead of --latency-ms.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    slow_rate: f64,
    /// How long a slow request waits.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshcanary-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    // House rule: everything this project starts stays on 127.0.0.0/8.
    let on_loopback = matches!(args.listen, SocketAddr::V4(v4) if v4.ip().is_loopback());
    if !on_loopback {
        return Err(format!(
            "--listen {}: only addresses in 127.0.0.0/8 are allowed",
            args.listen
        ));
    }
    // Checked now because a name that cannot be a header would fail every answer.
    if hyper::header::HeaderValue::from_str(&args.name).is_err() {
        return Err(format!(
            "--name {:?}: not a valid header value (use visible ASCII)",
            args.name
        ));
    }
    let behaviour = Behaviour {
        status: args.status,
        delay: Duration::from_millis(args.latency_ms),
        error_rate: args.error_rate,
        slow_rate: args.slow_rate,
        slow_delay: Duration::from_millis(args.slow_ms),
        ..Behaviour::default()
    };
    let options = Options {
        listen: args.listen,
        control: true,
        // Only counts are reported, so keeping every request would only grow memory.
        record: false,
    };
    let upstream = Upstream::start_with_options(&args.name, behaviour, options)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;

    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening {}", upstream.addr)
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;

    // Serve until killed: SIGTERM's and SIGINT's default action ends the process, and
    // there is nothing to clean up.
    std::future::pending::<()>().await;
    Ok(())
}
