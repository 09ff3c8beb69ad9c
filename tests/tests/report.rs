//! `meshcanary report` checked in a real browser: the reports `make demo` writes for a
//! real run (real Envoy, upstreams, load and controller, `--fast` pace) are loaded in
//! headless Chromium (Debian's `chromium`). The page must log nothing to the console,
//! load nothing (Resource Timing lists no fetch), and Chromium's DOM must hold the plots
//! with as many points and markers as the event stream has; a screenshot's plot areas must
//! show the series' colours. The CLI's exit codes on bad input are checked too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshcanary_e2e::paths;
use serde_json::Value;
use tokio::process::Command;

/// Chromium: `$MESHCANARY_CHROMIUM`, else Debian's.
fn chromium() -> PathBuf {
    std::env::var_os("MESHCANARY_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Whether Chromium can run here; in CI its absence fails the test (`make test`
/// installs it), elsewhere the test says it did not run.
fn chromium_available(test: &str) -> bool {
    if chromium().exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: {} not found; `make chromium` installs it (or set MESHCANARY_CHROMIUM)",
            chromium().display()
        );
    }
    eprintln!(
        "{test}: NOT RUN: {} not found (`make chromium`, or set MESHCANARY_CHROMIUM)",
        chromium().display()
    );
    false
}

/// One headless Chromium run on `page` with its own profile; nothing it does reaches
/// past this machine (every host name resolves to nothing, background services off).
async fn chromium_run(page: &Path, window: (u32, u32), mode: &[String]) -> (String, String) {
    let profile = tempfile::tempdir().expect("profile dir");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(chromium())
            .args([
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--window-size={},{}", window.0, window.1))
            .args(mode)
            .arg(format!("file://{}", page.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium ends within 60 s")
    .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The page as Chromium's DOM after loading it, and every console message it logged.
async fn load(page: &Path) -> (String, Vec<String>) {
    let (dom, log) = chromium_run(page, (1000, 1000), &["--dump-dom".to_string()]).await;
    let console = log
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    (dom, console)
}

/// What the probe script (added to a copy of the page, never to the report itself)
/// measured in Chromium: the page's height, every resource it fetched, and the box of
/// each plot area.
async fn probe(page: &Path, dir: &Path) -> Value {
    const PROBE: &str = "<script>window.addEventListener('load', () => {\
        const plots = [...document.querySelectorAll('svg.plot')].map(svg => {\
          const r = svg.querySelector('rect.plot-area').getBoundingClientRect();\
          return {plot: svg.dataset.plot, id: svg.id, x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height};\
        });\
        document.documentElement.setAttribute('data-probe', JSON.stringify({\
          height: document.documentElement.scrollHeight,\
          resources: performance.getEntriesByType('resource').map(e => e.name),\
          plots}));\
        });</script>";
    let html = std::fs::read_to_string(page).expect("page");
    let copy = dir.join(format!(
        "probe-{}",
        page.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("page.html")
    ));
    std::fs::write(
        &copy,
        html.replacen("</body>", &format!("{PROBE}</body>"), 1),
    )
    .expect("copy");
    let (dom, _) = load(&copy).await;
    let start = dom.find("data-probe=\"").expect("the probe ran") + "data-probe=\"".len();
    let end = start + dom[start..].find('"').expect("attribute ends");
    let json = dom[start..end]
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    serde_json::from_str(&json).expect("probe JSON")
}

/// A decoded screenshot.
struct Shot {
    info: png::OutputInfo,
    pixels: Vec<u8>,
}

/// A screenshot of the whole page (the window as tall as the page).
async fn screenshot(page: &Path, height: u32, out: &Path) -> Shot {
    chromium_run(
        page,
        (1000, height),
        &[format!("--screenshot={}", out.display())],
    )
    .await;
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(out).expect("screenshot written"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut pixels).expect("PNG pixels");
    Shot { info, pixels }
}

/// Pixels within `rect` (x, y, w, h) close to `rgb`, and the number of distinct colours
/// there.
fn colour_count(shot: &Shot, rect: (f64, f64, f64, f64), rgb: (u8, u8, u8)) -> (usize, usize) {
    let (info, pixels) = (&shot.info, &shot.pixels);
    let channels = info.color_type.samples();
    {
        let mut hits = 0;
        let mut distinct = std::collections::HashSet::new();
        let (x0, y0) = (rect.0.max(0.0) as u32, rect.1.max(0.0) as u32);
        let (x1, y1) = (
            ((rect.0 + rect.2) as u32).min(info.width),
            ((rect.1 + rect.3) as u32).min(info.height),
        );
        for y in y0..y1 {
            for x in x0..x1 {
                let i = (y as usize * info.line_size) + x as usize * channels;
                let (r, g, b) = (pixels[i], pixels[i + 1], pixels[i + 2]);
                distinct.insert((r, g, b));
                let near = |a: u8, b: u8| a.abs_diff(b) <= 24;
                if near(r, rgb.0) && near(g, rgb.1) && near(b, rgb.2) {
                    hits += 1;
                }
            }
        }
        (hits, distinct.len())
    }
}

/// The `<svg class="plot" …>` element of kind `plot` in the DOM, as text.
fn plot_svg<'a>(dom: &'a str, plot: &str) -> &'a str {
    let start = dom
        .find(&format!("data-plot=\"{plot}\" xmlns"))
        .unwrap_or_else(|| panic!("no {plot} plot in the DOM"));
    let end = start + dom[start..].find("</svg>").expect("svg ends");
    &dom[start..end]
}

/// `data-points` of the series with class `class` in `svg`.
fn series_points(svg: &str, class: &str) -> usize {
    let start = svg
        .find(&format!("class=\"series {class}\""))
        .unwrap_or_else(|| panic!("no series {class}"));
    let tail = &svg[start..];
    let at = tail.find("data-points=\"").expect("data-points") + "data-points=\"".len();
    tail[at..at + tail[at..].find('"').expect("quote")]
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_of_a_real_demo_run_render_in_headless_chromium() {
    if !chromium_available("reports_of_a_real_demo_run_render_in_headless_chromium") {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");

    // The checks can fail: a page with a console error and a fetch is caught by both.
    let control = dir.path().join("control.html");
    std::fs::write(
        &control,
        "<!DOCTYPE html><html><body><img src=\"http://127.0.0.1:9/x.png\">\
         <script>console.error('control error')</script></body></html>",
    )
    .expect("control page");
    let (_, console) = load(&control).await;
    assert!(
        console.iter().any(|l| l.contains("control error")),
        "the console check sees console.error: {console:?}"
    );
    let probed = probe(&control, dir.path()).await;
    assert_eq!(
        probed["resources"].as_array().map(Vec::len),
        Some(1),
        "{probed}"
    );
    let blank = screenshot(&control, 600, &dir.path().join("control.png")).await;
    let (hits, _) = colour_count(&blank, (0.0, 0.0, 1000.0, 600.0), (0x67, 0x41, 0xd9));
    assert_eq!(
        hits, 0,
        "the colour check finds nothing on a page without plots"
    );

    // A real run: `make demo`'s program, fast pace.
    let reports = dir.path().join("reports");
    let output = Command::new(env!("CARGO_BIN_EXE_meshcanary-demo"))
        .arg("--fast")
        .arg("--meshcanary")
        .arg(paths::meshcanary_bin())
        .args(["--deadline-s", "100"])
        .arg("--report-dir")
        .arg(&reports)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .expect("the demo runs");
    let transcript = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{transcript}");
    println!("demo with reports: {:?}", started.elapsed());

    let shots = paths::repo().join("target/report-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    for label in ["healthy", "faulty"] {
        let page = reports.join(format!("{label}-report.html"));
        let events = std::fs::read_to_string(reports.join(format!("{label}-events.jsonl")))
            .expect("events saved");
        let events: Vec<Value> = events
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let count = |kinds: &[&str], numbers: bool| {
            events
                .iter()
                .filter(|e| kinds.contains(&e["event"].as_str().unwrap_or_default()))
                .filter(|e| !numbers || e.get("numbers").is_some())
                .count()
        };
        let applied = count(&["applied"], false);
        let verdicts = count(&["hold", "promote", "complete", "rollback"], true);
        let moves = count(&["promote", "complete", "rollback"], false);
        assert!(
            applied >= 2 && verdicts >= 3,
            "{label}: a real rollout\n{transcript}"
        );

        // Chromium's DOM: four plots, each with the run's markers; the weight plot with a
        // dot per applied weight, the evidence plot with one per verdict; a table row per
        // verdict.
        let (dom, console) = load(&page).await;
        assert!(console.is_empty(), "{label}: console messages: {console:?}");
        assert_eq!(dom.matches("<svg class=\"plot\"").count(), 4, "{label}");
        for plot in ["weight", "error-rate", "slow-rate", "evidence"] {
            let svg = plot_svg(&dom, plot);
            assert_eq!(
                svg.matches("class=\"marker ").count(),
                moves,
                "{label} {plot}: one marker per promote/complete/rollback"
            );
        }
        let weight = plot_svg(&dom, "weight");
        assert_eq!(series_points(weight, "s-weight"), applied, "{label}");
        let evidence = plot_svg(&dom, "evidence");
        assert_eq!(series_points(evidence, "s-errors"), verdicts, "{label}");
        assert_eq!(series_points(evidence, "s-slow"), verdicts, "{label}");
        assert!(
            evidence.contains("class=\"boundary\""),
            "{label}: the boundary line"
        );
        let errors = plot_svg(&dom, "error-rate");
        let canary_points = series_points(errors, "s-canary");
        let baseline_points = series_points(errors, "s-baseline");
        assert!(
            canary_points >= verdicts / 2 && baseline_points >= verdicts / 2,
            "{label}: rate points for most spans ({canary_points}, {baseline_points} of {verdicts})"
        );
        assert_eq!(
            dom.matches("<tr class=\"verdict ").count(),
            verdicts,
            "{label}: a table row per verdict"
        );
        let expected_marker = if label == "healthy" {
            "complete"
        } else {
            "rollback"
        };
        assert!(
            weight.contains(&format!("data-verdict=\"{expected_marker}\"")),
            "{label}: {expected_marker} marked"
        );

        // In the browser: nothing fetched; the plot areas where the DOM says they are.
        let probed = probe(&page, dir.path()).await;
        assert_eq!(
            probed["resources"].as_array().map(Vec::len),
            Some(0),
            "{label}: the page fetches nothing: {probed}"
        );
        let height = probed["height"].as_f64().expect("height") as u32;
        let shot = shots.join(format!("{label}.png"));
        let shot_pixels = screenshot(&page, height.clamp(600, 8000), &shot).await;
        let plots = probed["plots"].as_array().expect("plots");
        assert_eq!(plots.len(), 4);
        for plot in plots {
            let rect = (
                plot["x"].as_f64().unwrap_or(0.0),
                plot["y"].as_f64().unwrap_or(0.0),
                plot["w"].as_f64().unwrap_or(0.0),
                plot["h"].as_f64().unwrap_or(0.0),
            );
            assert!(rect.2 > 400.0 && rect.3 > 100.0, "{label}: {plot}");
            let colours: &[(&str, (u8, u8, u8))] = match plot["plot"].as_str().unwrap_or_default() {
                "weight" => &[("weight", (0x67, 0x41, 0xd9))],
                "error-rate" | "slow-rate" => &[
                    ("canary", (0xe8, 0x59, 0x0c)),
                    ("baseline", (0x19, 0x71, 0xc2)),
                ],
                _ => &[
                    ("Λ errors", (0xe8, 0x59, 0x0c)),
                    ("Λ slow", (0x0c, 0x85, 0x99)),
                ],
            };
            // Series may lie on one another (two rates at 0 %): each plot must show at
            // least one series' colour, and the faulty canary's error rate (ten times the
            // baseline's) both apart.
            let mut drawn = 0;
            for (name, rgb) in colours {
                let (hits, distinct) = colour_count(&shot_pixels, rect, *rgb);
                assert!(
                    distinct >= 4,
                    "{label} {}: a blank plot area ({distinct} colours) — {}",
                    plot["plot"],
                    shot.display()
                );
                if label == "faulty" && plot["plot"] == "error-rate" {
                    assert!(
                        hits >= 30,
                        "{label} error-rate: {name} drawn ({hits} pixels) — {}",
                        shot.display()
                    );
                }
                drawn += hits;
            }
            assert!(
                drawn >= 30,
                "{label} {}: series drawn in the plot area ({drawn} pixels of their colours) — {}",
                plot["plot"],
                shot.display()
            );
        }
        println!(
            "{label}: {verdicts} verdicts, {applied} weights, screenshot {}",
            shot.display()
        );
    }
    println!("report test took {:?}", started.elapsed());
}

async fn report_of(text: Option<&str>, dir: &Path) -> (Option<i32>, String, String) {
    let file = dir.join("events.jsonl");
    let arg = match text {
        Some(text) => {
            std::fs::write(&file, text).expect("events file");
            file.display().to_string()
        }
        None => dir.join("missing.jsonl").display().to_string(),
    };
    let output = Command::new(paths::meshcanary_bin())
        .args(["report", &arg])
        .output()
        .await
        .expect("meshcanary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_report_command_exits_2_on_bad_input_naming_the_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fixture =
        std::fs::read_to_string(paths::repo().join("tests/fixtures/report/faulty-events.jsonl"))
            .expect("fixture");

    let (code, page, _) = report_of(Some(&format!("a banner line\n{fixture}")), dir.path()).await;
    assert_eq!(code, Some(0));
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("data-verdict=\"rollback\""));

    let (code, _, stderr) = report_of(None, dir.path()).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");

    let broken = format!(
        "{}\n{{\"t\": 1, \"event\": \"applied\"\n",
        fixture.trim_end()
    );
    let line = broken.lines().count();
    let (code, page, stderr) = report_of(Some(&broken), dir.path()).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(page.is_empty(), "no page on bad input");
    assert!(
        stderr.contains(&format!("line {line}: not a valid JSON object")),
        "{stderr}"
    );

    let (code, _, stderr) = report_of(Some("no events here\n"), dir.path()).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no meshcanary events"), "{stderr}");
}
