//! The module as an OCI image (`make oci`, `meshcanary-oci`), proven with real parts: two
//! builds give the same bytes; the layout is the compat-variant shape Istio's agent and
//! Envoy Gateway pull (one tar+gzip layer whose `plugin.wasm` is the module); a real
//! registry (Debian's `docker-registry`, on loopback) takes it from a real client
//! (`skopeo`), keeps its manifest digest, and gives the module back, byte for byte, when
//! pulled by that digest.
//!
//! The registry test needs `skopeo` and `docker-registry` (`make registry-tools`, which
//! `make test` runs); without them it says NOT RUN, and fails under CI.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use meshcanary_e2e::paths;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};

const OCI: &str = env!("CARGO_BIN_EXE_meshcanary-oci");
const SKOPEO: &str = "/usr/bin/skopeo";
const REGISTRY: &str = "/usr/bin/docker-registry";
/// Every external command is bounded by this.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn module() -> Vec<u8> {
    let path = paths::wasm();
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (make wasm)", path.display()))
}

/// Runs `meshcanary-oci` with these arguments.
fn run_oci(args: &[&str]) -> Output {
    std::process::Command::new(OCI)
        .args(args)
        .output()
        .expect("run meshcanary-oci")
}

/// Builds the layout of `module` into `out`; returns what it printed.
fn build(module: &Path, out: &Path) -> String {
    let output = run_oci(&[
        "--module",
        &module.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert!(
        output.status.success(),
        "meshcanary-oci: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every file of a folder, by relative path.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                out.insert(
                    path.strip_prefix(root).expect("inside").to_path_buf(),
                    bytes,
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// An OCI image layout, read back independently of the code that wrote it.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn json(&self, relative: &str) -> Value {
        let bytes = std::fs::read(self.dir.join(relative)).expect(relative);
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{relative}: {e}"))
    }

    /// A blob's bytes, after checking they hash to its name.
    fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        let bytes = std::fs::read(self.dir.join("blobs/sha256").join(hex)).expect("blob");
        assert_eq!(sha256_hex(&bytes), hex, "blob content matches its digest");
        bytes
    }

    /// The manifest descriptor the index names `reference`.
    fn manifest_descriptor(&self, reference: &str) -> Value {
        let index = self.json("index.json");
        index["manifests"]
            .as_array()
            .expect("index.manifests")
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference)
            .cloned()
            .unwrap_or_else(|| panic!("no image {reference:?} in {index}"))
    }

    /// The manifest digest and bytes of image `reference`.
    fn manifest(&self, reference: &str) -> (String, Vec<u8>) {
        let descriptor = self.manifest_descriptor(reference);
        let digest = descriptor["digest"].as_str().expect("digest").to_string();
        let bytes = self.blob(&digest);
        assert_eq!(descriptor["size"], json!(bytes.len()));
        (digest, bytes)
    }

    /// `plugin.wasm` from image `reference`, after checking the image's shape: what
    /// Istio's agent and Envoy Gateway look for in the compat variant.
    fn plugin_wasm(&self, reference: &str) -> Vec<u8> {
        let (_, bytes) = self.manifest(reference);
        let manifest: Value = serde_json::from_slice(&bytes).expect("manifest JSON");
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            manifest["annotations"]["module.wasm.image/variant"],
            "compat"
        );
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.oci.image.config.v1+json"
        );
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1, "one layer");
        assert_eq!(
            layers[0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let layer = self.blob(layers[0]["digest"].as_str().expect("layer digest"));
        assert_eq!(layers[0]["size"], json!(layer.len()));
        let config_bytes = self.blob(manifest["config"]["digest"].as_str().expect("config"));
        assert_eq!(manifest["config"]["size"], json!(config_bytes.len()));
        let config: Value = serde_json::from_slice(&config_bytes).expect("config JSON");

        // gzip header: no name, no mtime, so the same tar always compresses the same.
        assert_eq!(&layer[..3], &[0x1f, 0x8b, 8], "gzip, deflate");
        assert_eq!(
            layer[3], 0,
            "no gzip header flags (no file name, no comment)"
        );
        assert_eq!(&layer[4..8], &[0, 0, 0, 0], "gzip mtime 0");
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&layer[..])
            .read_to_end(&mut tar)
            .expect("the layer decompresses");
        assert_eq!(
            config,
            json!({
                "architecture": "wasm",
                "os": "wasip1",
                "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]}
            }),
            "diff_ids is the uncompressed layer's digest"
        );

        let mut archive = tar::Archive::new(&tar[..]);
        let mut found = Vec::new();
        let mut plugin = None;
        for entry in archive.entries().expect("tar entries") {
            let mut entry = entry.expect("tar entry");
            let header = entry.header().clone();
            let path = entry.path().expect("entry path").display().to_string();
            found.push(path.clone());
            assert_eq!(header.entry_type(), tar::EntryType::Regular, "{path}");
            assert_eq!(header.mode().expect("mode"), 0o644, "{path}");
            assert_eq!(header.mtime().expect("mtime"), 0, "{path}");
            assert_eq!(header.uid().expect("uid"), 0, "{path}");
            assert_eq!(header.gid().expect("gid"), 0, "{path}");
            assert_eq!(header.username().expect("user"), Some("root"), "{path}");
            assert_eq!(header.groupname().expect("group"), Some("root"), "{path}");
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).expect("entry bytes");
            plugin = Some(bytes);
        }
        assert_eq!(found, ["plugin.wasm"], "the layer holds plugin.wasm only");
        plugin.expect("plugin.wasm")
    }
}

#[test]
fn two_builds_are_the_same_bytes_and_the_image_holds_the_module_as_plugin_wasm() {
    let module = module();
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b/oci"));
    let printed = build(&paths::wasm(), &a);
    build(&paths::wasm(), &b);

    let files_a = files(&a);
    assert_eq!(files_a, files(&b), "two builds, byte for byte the same");
    assert_eq!(files_a.len(), 5, "oci-layout, index.json, three blobs");
    let layout = Layout { dir: a.clone() };
    assert_eq!(
        layout.json("oci-layout"),
        json!({"imageLayoutVersion": "1.0.0"})
    );
    assert_eq!(
        layout.json("index.json")["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert!(
        layout.plugin_wasm("latest") == module,
        "plugin.wasm is the module, byte for byte"
    );
    let (digest, _) = layout.manifest("latest");
    let digest_hex = digest.trim_start_matches("sha256:");
    assert!(
        printed.contains(&format!("manifest {digest}")),
        "prints the manifest digest:\n{printed}"
    );
    assert!(
        printed.contains(&format!("@{digest} (WasmPlugin sha256: {digest_hex})")),
        "prints the reference to pin:\n{printed}"
    );
    assert!(
        printed.contains(&format!("module   sha256:{}", sha256_hex(&module))),
        "prints the module's sha256:\n{printed}"
    );

    // A rebuild into the same folder replaces it; --tag names the image.
    let output = run_oci(&[
        "--module",
        &paths::wasm().display().to_string(),
        "--out",
        &a.display().to_string(),
        "--tag",
        "v1.2.3",
    ]);
    assert!(output.status.success());
    let layout = Layout { dir: a.clone() };
    assert_eq!(
        layout.manifest("v1.2.3").0,
        digest,
        "same image, other name"
    );
    assert_eq!(
        layout.json("index.json")["manifests"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "the previous build is gone"
    );

    // Another module (one byte more) is another image.
    let other = dir.path().join("other.wasm");
    let mut other_bytes = module.clone();
    other_bytes.push(0);
    std::fs::write(&other, &other_bytes).expect("write");
    let c = dir.path().join("c");
    build(&other, &c);
    let layout_c = Layout { dir: c };
    assert_ne!(layout_c.manifest("latest").0, digest);
    assert!(layout_c.plugin_wasm("latest") == other_bytes);
}

#[test]
fn bad_input_is_refused_with_exit_2_and_a_message_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let not_wasm = dir.path().join("policy.json");
    std::fs::write(&not_wasm, b"{}").expect("write");
    let precious = dir.path().join("precious");
    std::fs::create_dir(&precious).expect("mkdir");
    std::fs::write(precious.join("notes.txt"), b"keep me").expect("write");
    let module = paths::wasm().display().to_string();
    let out = dir.path().join("out").display().to_string();
    for (args, expected) in [
        (
            vec!["--module", "/nonexistent/m.wasm", "--out", &out],
            "--module /nonexistent/m.wasm: ",
        ),
        (
            vec!["--module", not_wasm.to_str().expect("utf-8"), "--out", &out],
            "not a Wasm module",
        ),
        (
            vec!["--module", &module, "--out", &out, "--tag=.hidden"],
            "--tag \".hidden\": expected",
        ),
        (
            vec![
                "--module",
                &module,
                "--out",
                precious.to_str().expect("utf-8"),
            ],
            "exists and is not an OCI image layout",
        ),
    ] {
        let output = run_oci(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert_eq!(
        std::fs::read(precious.join("notes.txt")).expect("still there"),
        b"keep me"
    );
    assert!(!dir.path().join("out").exists(), "nothing written");
}

/// A `docker-registry` on loopback, storing in a temp folder; killed when dropped.
struct Registry {
    addr: String,
    log: PathBuf,
    _child: Child,
}

impl Registry {
    async fn start(dir: &Path) -> Registry {
        // A free port: bind, learn it, release it for the registry.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        let log = dir.join("registry.log");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n  secret: meshcanary-test\n",
                dir.join("storage").display()
            ),
        )
        .expect("registry config");
        let log_file = std::fs::File::create(&log).expect("registry log");
        let mut child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("start docker-registry");
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "docker-registry exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let answer = client.get(format!("http://{addr}/v2/")).send().await;
            if answer.is_ok_and(|a| a.status() == 200) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "docker-registry not answering within 15 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Registry {
            addr,
            log,
            _child: child,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `skopeo ARGS` with a policy that accepts unsigned images, no credentials, bounded.
async fn skopeo(dir: &Path, args: &[&str]) -> Output {
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        json!({"default": [{"type": "insecureAcceptAnything"}]}).to_string(),
    )
    .expect("policy");
    let mut command = Command::new(SKOPEO);
    command
        .arg("--policy")
        .arg(&policy)
        .args(args)
        .env("TMPDIR", dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("skopeo {args:?} took over {COMMAND_TIMEOUT:?}"))
        .expect("run skopeo")
}

fn tools_present() -> bool {
    let present = Path::new(SKOPEO).is_file() && Path::new(REGISTRY).is_file();
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "skopeo or docker-registry missing: apt-get install skopeo docker-registry (make registry-tools does)"
        );
        eprintln!("oci registry test: NOT RUN (no skopeo / docker-registry: make registry-tools)");
    }
    present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_the_image_to_a_real_registry_and_pulls_the_same_module_back_by_digest() {
    if !tools_present() {
        return;
    }
    let started = Instant::now();
    let module = module();
    let dir = tempfile::tempdir().expect("temp dir");
    let layout_dir = dir.path().join("oci");
    build(&paths::wasm(), &layout_dir);
    let (local_digest, local_manifest) = Layout {
        dir: layout_dir.clone(),
    }
    .manifest("latest");
    let registry = Registry::start(dir.path()).await;
    let repository = format!("{}/meshcanary/filter", registry.addr);

    // Push by tag, as a release would.
    let digest_file = dir.path().join("pushed.digest");
    let source = format!("oci:{}:latest", layout_dir.display());
    let destination = format!("docker://{repository}:0.1.0");
    let pushed = skopeo(
        dir.path(),
        &[
            "copy",
            "--dest-tls-verify=false",
            "--dest-no-creds",
            "--digestfile",
            &digest_file.display().to_string(),
            &source,
            &destination,
        ],
    )
    .await;
    assert!(
        pushed.status.success(),
        "skopeo copy (push): {}\nregistry:\n{}",
        String::from_utf8_lossy(&pushed.stderr),
        registry.log()
    );
    assert_eq!(
        std::fs::read_to_string(&digest_file).expect("digest file"),
        local_digest,
        "the pushed manifest's digest is the local one"
    );

    // The registry serves the tag with the very manifest bytes built here.
    let answer = reqwest::Client::new()
        .get(format!(
            "http://{}/v2/meshcanary/filter/manifests/0.1.0",
            registry.addr
        ))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(local_digest.as_str()),
        "the registry's digest for the tag"
    );
    assert!(
        answer.bytes().await.expect("manifest body")[..] == local_manifest[..],
        "the registry stores the manifest unchanged"
    );

    // Pull by digest, as Istio's agent does with oci://…@sha256:…, into another layout.
    let pulled_dir = dir.path().join("pulled");
    let pulled = skopeo(
        dir.path(),
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-no-creds",
            &format!("docker://{repository}@{local_digest}"),
            &format!("oci:{}:pulled", pulled_dir.display()),
        ],
    )
    .await;
    assert!(
        pulled.status.success(),
        "skopeo copy (pull by digest): {}\nregistry:\n{}",
        String::from_utf8_lossy(&pulled.stderr),
        registry.log()
    );
    let pulled_layout = Layout { dir: pulled_dir };
    assert_eq!(pulled_layout.manifest("pulled").0, local_digest);
    assert!(
        pulled_layout.plugin_wasm("pulled") == module,
        "the pulled image's plugin.wasm is target/wasm/meshcanary_filter.wasm, byte for byte"
    );

    // A digest pins: one that differs in a single digit is not served.
    let mut wrong = local_digest.clone();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(wrong.len() - 1.., last);
    let refused = skopeo(
        dir.path(),
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-no-creds",
            &format!("docker://{repository}@{wrong}"),
            &format!("oci:{}:wrong", dir.path().join("wrong").display()),
        ],
    )
    .await;
    assert!(
        !refused.status.success(),
        "pulled an image by a wrong digest"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("manifest unknown"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    drop(registry);
    eprintln!(
        "oci registry test: push, pull by digest and checks in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
