//! Driving the `meshcanary` binary from tests and the demo: spawn it with
//! `--output json`, collect its events as they come (with the instant each arrived),
//! wait for its exit.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::{lock, paths};

/// How long [`Controller::wait`] waits, once the process has exited, for its output
/// readers to reach the end of its stdout and stderr (they do at once unless another
/// process inherited the pipes and keeps them open).
const READERS_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// One event the controller printed.
#[derive(Debug, Clone)]
pub struct Event {
    /// When the line arrived.
    pub at: Instant,
    /// The JSON object.
    pub json: Value,
}

impl Event {
    /// The event's kind (`start`, `applied`, `hold`, `promote`, `rollback`, …).
    pub fn kind(&self) -> &str {
        self.json["event"].as_str().unwrap_or_default()
    }
}

/// A running `meshcanary` command; killed when dropped.
pub struct Controller {
    child: Child,
    events: Arc<Mutex<Vec<Event>>>,
    stderr: Arc<Mutex<String>>,
    /// The tasks reading stdout and stderr; each ends at its pipe's end.
    readers: Vec<JoinHandle<()>>,
}

impl Controller {
    /// Starts `meshcanary <args> --output json` (the workspace's build, see
    /// [`paths::meshcanary_bin`]); panics when it cannot, as a test should.
    pub fn spawn(args: &[&str]) -> Controller {
        let bin = paths::meshcanary_bin();
        assert!(
            bin.exists(),
            "{} not found: build it with `cargo build -p meshcanary` (make test does)",
            bin.display()
        );
        Controller::start(&bin, args).expect("start meshcanary")
    }

    /// Starts `<bin> <args> --output json`; for programs (the demo) that report a
    /// failure to start instead of panicking.
    pub fn start(bin: &Path, args: &[&str]) -> std::io::Result<Controller> {
        let mut command = Command::new(bin);
        command.args(args);
        Controller::start_command(command)
    }

    /// Starts `command` with `--output json` appended: for a controller run under a
    /// wrapper (another user, a faked clock), which the caller sets up.
    pub fn start_command(mut command: Command) -> std::io::Result<Controller> {
        let mut child = command
            .args(["--output", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let events = Arc::clone(&events);
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let json = serde_json::from_str(&line).unwrap_or(Value::String(line));
                    lock(&events).push(Event {
                        at: Instant::now(),
                        json,
                    });
                }
            }));
        }
        if let Some(err) = child.stderr.take() {
            let stderr = Arc::clone(&stderr);
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut s = lock(&stderr);
                    s.push_str(&line);
                    s.push('\n');
                }
            }));
        }
        Ok(Controller {
            child,
            events,
            stderr,
            readers,
        })
    }

    /// `meshcanary run SPEC`.
    pub fn run(spec: &Path) -> Controller {
        Controller::spawn(&["run", &spec.display().to_string()])
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.events).clone()
    }

    /// What it wrote to standard error so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Where a `serve` controller listens for /metrics and /healthz: the address its
    /// `serve` event reports. Start it with `--listen 127.0.0.1:0` and the system picks a
    /// free port that nothing else can take in between (as a port found free beforehand
    /// could be). Panics with the transcript when no such event comes within `timeout`.
    pub async fn serving_address(&self, timeout: Duration) -> String {
        let event = self.wait_event("serve", timeout, |_| true).await;
        match event.as_ref().and_then(|e| e.json["listen"].as_str()) {
            Some(listen) => listen.to_string(),
            None => panic!("no serve event with its address\n{}", self.transcript()),
        }
    }

    /// Waits for the first event of `kind` satisfying `pred`.
    pub async fn wait_event(
        &self,
        kind: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .events()
                .into_iter()
                .find(|e| e.kind() == kind && pred(&e.json))
            {
                return Some(e);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process to exit; its exit code (`None` if it did not exit in time,
    /// in which case it is killed). Once it returns a code, every line the process printed
    /// is in [`events`](Self::events) and [`stderr`](Self::stderr): it waits for the
    /// readers to reach the end of both pipes (at most [`READERS_DRAIN_LIMIT`]).
    pub async fn wait(&mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                let readers = std::mem::take(&mut self.readers);
                let drained = async {
                    for reader in readers {
                        let _ = reader.await;
                    }
                };
                let _ = tokio::time::timeout(READERS_DRAIN_LIMIT, drained).await;
                status.code()
            }
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// Its exit status if it has exited, without waiting (`Ok(None)` while it runs). The
    /// last lines it printed may still be on their way: give the readers a moment.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Asks it to stop with SIGTERM, as Kubernetes does.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends it a signal by name (`TERM`, `STOP`, `CONT`, …).
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{name}"), &pid.to_string()])
                .status();
        }
    }

    /// Kills it with SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }

    /// A readable transcript, for assertion messages.
    pub fn transcript(&self) -> String {
        let mut s: String = self
            .events()
            .iter()
            .map(|e| format!("{}\n", e.json))
            .collect();
        s.push_str(&self.stderr());
        s
    }
}

/// A TCP forwarder that can be switched off: then live connections are cut and new ones
/// are accepted and closed at once, as an unreachable endpoint looks to a client (a
/// keep-alive connection must not survive, or the client would never notice).
pub struct Forwarder {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    target: Arc<Mutex<std::net::SocketAddr>>,
}

impl Forwarder {
    /// Forwards a loopback port to `target`.
    pub async fn start(target: std::net::SocketAddr) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (open, gate) = tokio::sync::watch::channel(true);
        let target = Arc::new(Mutex::new(target));
        let current = Arc::clone(&target);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*gate.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut gate = gate.clone();
                let target = *lock(&current);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = gate.wait_for(|open| !*open) => {}
                        }
                    }
                });
            }
        });
        Forwarder { addr, open, target }
    }

    /// Sends new connections to `target` from now on (a restarted process on new ports
    /// stays at the address its clients know).
    pub fn set_target(&self, target: std::net::SocketAddr) {
        *lock(&self.target) = target;
    }

    /// Lets connections through (`true`) or cuts them (`false`).
    pub fn set_open(&self, open: bool) {
        let _ = self.open.send(open);
    }
}

/// Starts the load generator (`meshcanary-load`, the binary at `bin`) against `url`:
/// `rps` requests/s from 5,000 users over `concurrency` connections, for at most 90 s and
/// 100,000 requests; killed when the handle is dropped.
pub fn start_load(bin: &Path, url: &str, rps: u32, concurrency: u32) -> Child {
    Command::new(bin)
        .args(["--url", url, "--rps", &rps.to_string()])
        .args(["--duration-s", "90", "--max-requests", "100000"])
        .args([
            "--concurrency",
            &concurrency.to_string(),
            "--user-ids",
            "5000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the load generator")
}

/// The canary's weight (basis points) in the split rule at `rule` of the policy inside
/// the ECDS file at `ecds`, as the controller wrote it.
pub fn ecds_canary_weight(ecds: &Path, rule: usize) -> u64 {
    let text = std::fs::read_to_string(ecds).expect("ECDS file");
    let document: Value = serde_json::from_str(&text).expect("ECDS JSON");
    let policy: Value = serde_json::from_str(
        document["resources"][0]["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .expect("policy string"),
    )
    .expect("policy JSON");
    policy["rules"][rule]["split"]["weights"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["variant"] == "canary"))
        .and_then(|w| w["weight"].as_u64())
        .unwrap_or(0)
}

/// The rollout record the ECDS file sink keeps next to `ecds` (`<ecds>.state.json`).
pub fn saved_record(ecds: &Path) -> Value {
    let mut path = ecds.as_os_str().to_owned();
    path.push(".state.json");
    let text = std::fs::read_to_string(std::path::PathBuf::from(path)).expect("record");
    serde_json::from_str(&text).expect("record JSON")
}
