//! `meshcanary-oci`: the filter module as an OCI image layout, without a container engine
//! and byte for byte reproducible (`make oci`).
//!
//! ```text
//! meshcanary-oci [--module target/wasm/meshcanary_filter.wasm] [--out target/oci] [--tag latest]
//! ```
//!
//! The image is the *compat* variant of the Wasm image specification, the shape Istio's
//! agent, Envoy Gateway and any registry take without custom media types:
//!
//! * an image manifest (`application/vnd.oci.image.manifest.v1+json`) annotated
//!   `module.wasm.image/variant: compat`,
//! * an image config (`application/vnd.oci.image.config.v1+json`): architecture `wasm`,
//!   os `wasip1`, `rootfs.diff_ids` the sha256 of the uncompressed layer,
//! * one layer (`application/vnd.oci.image.layer.v1.tar+gzip`): a tar holding one file,
//!   `plugin.wasm`, the module's bytes.
//!
//! In the layout (`oci-layout`, `index.json`, `blobs/sha256/…`) the manifest is named by
//! the `org.opencontainers.image.ref.name` annotation `--tag`, so `skopeo copy
//! oci:target/oci:latest docker://…` finds it.
//!
//! Reproducible: the tar entry has mtime 0, uid/gid 0, owner and group `root`, mode 0644;
//! the gzip stream has mtime 0, no file name, OS byte 255 ("unknown") and level 9, from
//! the flate2 backend Cargo.lock pins; every JSON document has its keys sorted and no
//! whitespace. The same module gives the same manifest digest, on any machine.
//!
//! Prints the module's sha256, each blob's digest and the manifest digest, the one to pin
//! (`oci://REGISTRY/REPOSITORY@sha256:…`). Exit codes: 0 written, 2 invalid input (no
//! module, not a Wasm module, a bad tag or output folder), 1 any other failure.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use flate2::{Compression, GzBuilder};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Media type of the image manifest.
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the image index (`index.json`).
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of the image config.
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the layer: Istio's agent requires a gzip-compressed tar here.
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The file the image fetchers look for in the layer.
const PLUGIN_FILE: &str = "plugin.wasm";
/// The first four bytes of every Wasm module.
const WASM_MAGIC: &[u8] = b"\0asm";

/// Builds an OCI image layout holding the filter module as `plugin.wasm`.
#[derive(Debug, Parser)]
#[command(name = "meshcanary-oci", version)]
struct Args {
    /// The Wasm module to package.
    #[arg(long, default_value = "target/wasm/meshcanary_filter.wasm")]
    module: PathBuf,
    /// The OCI image layout to write; replaced if it already holds one.
    #[arg(long, default_value = "target/oci")]
    out: PathBuf,
    /// Name of the image inside the layout (`oci:OUT:TAG` for skopeo).
    #[arg(long, default_value = "latest")]
    tag: String,
}

/// Why the layout was not written.
#[derive(Debug)]
enum Failure {
    /// The input is wrong (exit 2).
    Invalid(String),
    /// Anything else, I/O mostly (exit 1).
    Other(String),
}

/// One content-addressed blob of the image.
struct Blob {
    /// `sha256:<hex>`.
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        Blob {
            digest: format!("sha256:{}", sha256_hex(&bytes)),
            bytes,
        }
    }

    /// Its OCI descriptor.
    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// The whole image, in memory.
struct Image {
    module_sha256: String,
    module_size: usize,
    layer: Blob,
    diff_id: String,
    config: Blob,
    manifest: Blob,
    index: Vec<u8>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(message)) => {
            eprintln!("meshcanary-oci: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Other(message)) => {
            eprintln!("meshcanary-oci: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    if !tag_ok(&args.tag) {
        return Err(Failure::Invalid(format!(
            "--tag {:?}: expected 1-128 characters of letters, digits, '_', '.', '-', not starting with '.' or '-'",
            args.tag
        )));
    }
    let module = std::fs::read(&args.module).map_err(|e| {
        Failure::Invalid(format!(
            "--module {}: {e} (build it with `make wasm`)",
            args.module.display()
        ))
    })?;
    if !module.starts_with(WASM_MAGIC) {
        return Err(Failure::Invalid(format!(
            "--module {}: not a Wasm module (it does not start with \\0asm)",
            args.module.display()
        )));
    }
    let image = build(&module, &args.tag)?;
    write_layout(&args.out, &image)?;
    let manifest_hex = image
        .manifest
        .digest
        .strip_prefix("sha256:")
        .unwrap_or_default();
    println!(
        "meshcanary-oci: {} (OCI image layout, image {:?})",
        args.out.display(),
        args.tag
    );
    println!(
        "module   sha256:{} ({} bytes, as {PLUGIN_FILE})",
        image.module_sha256, image.module_size
    );
    println!(
        "layer    {} ({} bytes, {LAYER_MEDIA_TYPE}; diff_id {})",
        image.layer.digest,
        image.layer.bytes.len(),
        image.diff_id
    );
    println!(
        "config   {} ({} bytes)",
        image.config.digest,
        image.config.bytes.len()
    );
    println!(
        "manifest {} ({} bytes)",
        image.manifest.digest,
        image.manifest.bytes.len()
    );
    // The manifest digest is the image digest: what a registry answers for a pull by
    // digest, and what Istio's agent compares a `sha256` with for an oci:// module.
    println!(
        "pin it:  oci://REGISTRY/REPOSITORY@{} (WasmPlugin sha256: {manifest_hex})",
        image.manifest.digest
    );
    Ok(())
}

/// The image for this module: layer, config, manifest and index, all deterministic.
fn build(module: &[u8], tag: &str) -> Result<Image, Failure> {
    let tar = layer_tar(module).map_err(|e| Failure::Other(format!("writing the tar: {e}")))?;
    let diff_id = format!("sha256:{}", sha256_hex(&tar));
    let layer =
        Blob::new(gzip(&tar).map_err(|e| Failure::Other(format!("compressing the layer: {e}")))?);
    // The smallest valid image config: platform, and the uncompressed layer's digest.
    let config = Blob::new(canonical_json(&json!({
        "architecture": "wasm",
        "os": "wasip1",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}
    }))?);
    let manifest = Blob::new(canonical_json(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(CONFIG_MEDIA_TYPE),
        "layers": [layer.descriptor(LAYER_MEDIA_TYPE)],
        // Required by the Wasm image specification's compat variant for this layer type.
        "annotations": {"module.wasm.image/variant": "compat"}
    }))?);
    let mut manifest_descriptor = manifest.descriptor(MANIFEST_MEDIA_TYPE);
    manifest_descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = canonical_json(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [manifest_descriptor]
    }))?;
    Ok(Image {
        module_sha256: sha256_hex(module),
        module_size: module.len(),
        layer,
        diff_id,
        config,
        manifest,
        index,
    })
}

/// A tar holding `plugin.wasm` and nothing else, with fixed metadata.
fn layer_tar(module: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(module.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_username("root")?;
    header.set_groupname("root")?;
    header.set_mtime(0);
    let mut builder = tar::Builder::new(Vec::new());
    // Sets the path and the checksum.
    builder.append_data(&mut header, PLUGIN_FILE, module)?;
    builder.into_inner()
}

/// Gzip with a fixed header (mtime 0, no name, OS "unknown") and a fixed level.
fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), Compression::best());
    encoder.write_all(bytes)?;
    encoder.finish()
}

/// `value` as compact JSON with every object's keys sorted, whatever serde_json's map
/// keeps (insertion order when a dependency enables `preserve_order`).
fn canonical_json(value: &Value) -> Result<Vec<u8>, Failure> {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let mut out = Map::new();
                for key in keys {
                    out.insert(key.clone(), sorted(&map[key]));
                }
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_vec(&sorted(value)).map_err(|e| Failure::Other(format!("JSON: {e}")))
}

/// Writes the layout to a fresh folder beside `out`, then puts it in `out`'s place, so
/// `out` never holds a mix of two builds.
fn write_layout(out: &Path, image: &Image) -> Result<(), Failure> {
    if out.exists() && !is_replaceable(out) {
        return Err(Failure::Invalid(format!(
            "--out {}: exists and is not an OCI image layout (no oci-layout file); not replacing it",
            out.display()
        )));
    }
    let name = out
        .file_name()
        .ok_or_else(|| Failure::Invalid(format!("--out {}: not a folder name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |what: &str, path: &Path, e: std::io::Error| {
        Failure::Other(format!("{what} {}: {e}", path.display()))
    };
    std::fs::create_dir_all(&parent).map_err(|e| io("creating", &parent, e))?;
    let mut staging_name = name.to_os_string();
    staging_name.push(format!(".building-{}", std::process::id()));
    let staging = parent.join(staging_name);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io("removing", &staging, e))?;
    }
    let blobs = staging.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| io("creating", &blobs, e))?;
    let mut files: Vec<(PathBuf, &[u8])> = vec![
        (
            staging.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        ),
        (staging.join("index.json"), &image.index),
    ];
    for blob in [&image.layer, &image.config, &image.manifest] {
        let hex = blob.digest.strip_prefix("sha256:").unwrap_or(&blob.digest);
        files.push((blobs.join(hex), &blob.bytes));
    }
    for (path, bytes) in files {
        std::fs::write(&path, bytes).map_err(|e| io("writing", &path, e))?;
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| io("removing the previous", out, e))?;
    }
    std::fs::rename(&staging, out).map_err(|e| io("renaming into place", out, e))
}

/// An empty folder, or one holding an OCI image layout.
fn is_replaceable(out: &Path) -> bool {
    out.join("oci-layout").is_file()
        || std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_none())
}

/// A Docker/OCI tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn tag_ok(tag: &str) -> bool {
    let mut chars = tag.chars();
    tag.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest.iter() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}
