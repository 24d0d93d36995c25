//! Helpers shared by the integration tests: the real data folder, and small datasets the tests
//! write themselves (binary CIFAR records, image folders, archives).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{ImageBuffer, Rgb, RgbImage};

/// `$ATOP_DATA_DIR`; fails (never skips) when it is not set up, so CI cannot pass without data.
pub fn data_dir() -> PathBuf {
    let dir = std::env::var_os("ATOP_DATA_DIR").unwrap_or_else(|| {
        panic!("ATOP_DATA_DIR is not set: point it at the shared data (e.g. ../shared/data); `make test` does")
    });
    let dir = PathBuf::from(dir);
    assert!(
        dir.is_dir(),
        "ATOP_DATA_DIR={} is not a folder",
        dir.display()
    );
    // Absolute, so that commands run from another working directory find it too.
    dir.canonicalize().unwrap()
}

pub fn cifar10_jpg() -> PathBuf {
    let p = data_dir().join("cifar10-jpg.tar.gz");
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

pub fn imagenette_tar() -> PathBuf {
    let p = data_dir().join("imagenette2-224.tar");
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// A deterministic test image whose pixels encode (seed, x, y, channel).
pub fn pattern(w: u32, h: u32, seed: u8) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            (x as u8).wrapping_mul(16).wrapping_add(seed),
            (y as u8).wrapping_mul(16).wrapping_add(seed),
            seed.wrapping_mul(7),
        ])
    })
}

pub fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// One CIFAR binary record: label byte(s) then R, G, B planes.
pub fn cifar_record(labels: &[u8], img: &RgbImage) -> Vec<u8> {
    let mut rec = labels.to_vec();
    for c in 0..3 {
        rec.extend(img.pixels().map(|p| p[c]));
    }
    rec
}

/// Packs `files` (relative path, bytes) into a tar (optionally gzipped), with folder entries.
pub fn write_tar(path: &Path, files: &[(String, Vec<u8>)], gzip: bool) {
    let file = std::fs::File::create(path).unwrap();
    let writer: Box<dyn Write> = if gzip {
        Box::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ))
    } else {
        Box::new(file)
    };
    let mut builder = tar::Builder::new(writer);
    let mut dirs = std::collections::BTreeSet::new();
    for (rel, _) in files {
        let mut parent = Path::new(rel).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_path_buf());
            parent = p.parent();
        }
    }
    for dir in dirs {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        header.set_mode(0o755);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("{}/", dir.display()), std::io::empty())
            .unwrap();
    }
    for (rel, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, rel, bytes.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap().flush().unwrap();
}

/// The `atop` binary built for this test run.
pub fn atop() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_atop"))
}

/// Runs a command that must succeed (its stderr is shown if not); returns its output.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must succeed (its stderr is shown if not) and parses its JSON stdout.
pub fn run_json(cmd: &mut std::process::Command) -> serde_json::Value {
    serde_json::from_slice(&run_ok(cmd).stdout).unwrap()
}

/// Starts `cmd` (a training run into `run`) and SIGKILLs it as soon as its first checkpoint is
/// complete (`last.json` readable); returns the epoch it was killed after.
pub fn kill_after_first_checkpoint(cmd: &mut std::process::Command, run: &Path) -> usize {
    use std::time::{Duration, Instant};
    let last_epoch = || {
        atop::models::checkpoint::read_last(run)
            .ok()
            .map(|l| l.epoch)
    };
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while last_epoch().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint after 5 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    last_epoch().unwrap()
}

/// The epoch a run folder's `last.json` points to (None before the first checkpoint).
pub fn last_epoch(run: &Path) -> Option<usize> {
    atop::models::checkpoint::read_last(run)
        .ok()
        .map(|l| l.epoch)
}

/// A safetensors file's tensors sorted by name, to compare two runs' weights.
pub fn sorted_tensors(file: &Path) -> Vec<(String, tch::Tensor)> {
    let mut w = atop::models::checkpoint::read_tensors(file).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// A trained fixture shared by every test binary and kept between runs of the suite, in
/// `target/tmp/fixtures/NAME-KEY`. KEY hashes `config` (everything that defines the fixture)
/// and the `atop` binary, so any code change builds it afresh. The first test binary to ask
/// builds it under a file lock (the others wait for it), into a temporary folder renamed into
/// place; a manifest of its files' hashes is checked on every reuse, so a fixture some test
/// changed is rebuilt instead of trusted. `build(dir)` must create `dir` (a new path).
pub fn cached_fixture(name: &str, config: &str, build: impl FnOnce(&Path)) -> PathBuf {
    use sha2::{Digest, Sha256};
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&root).unwrap();
    let mut key = Sha256::new();
    key.update(config.as_bytes());
    key.update(std::fs::read(env!("CARGO_BIN_EXE_atop")).unwrap());
    let key: String = key.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = root.join(format!("{name}-{key}"));
    let manifest = root.join(format!("{name}-{key}.sha256"));
    let lock = std::fs::File::create(root.join(format!("{name}-{key}.lock"))).unwrap();
    lock.lock().unwrap();
    let fresh =
        std::fs::read_to_string(&manifest).is_ok_and(|m| dir.is_dir() && m == folder_digest(&dir));
    if !fresh {
        let tmp = root.join(format!("{name}-{key}.building"));
        for stale in [&tmp, &dir] {
            if stale.exists() {
                std::fs::remove_dir_all(stale).unwrap();
            }
        }
        build(&tmp);
        assert!(tmp.is_dir(), "fixture {name}: the build left no folder");
        std::fs::rename(&tmp, &dir).unwrap();
        let digest = folder_digest(&dir);
        let part = manifest.with_extension("sha256.tmp");
        std::fs::write(&part, digest).unwrap();
        std::fs::rename(&part, &manifest).unwrap();
    }
    dir
}

/// One line per file under `dir` (relative path and SHA-256), sorted.
fn folder_digest(dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let hash = Sha256::digest(std::fs::read(&path).unwrap());
                let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
                out.push(format!(
                    "{hex}  {}",
                    path.strip_prefix(base).unwrap().display()
                ));
            }
        }
    }
    let mut lines = Vec::new();
    walk(dir, dir, &mut lines);
    lines.sort();
    lines.join("\n") + "\n"
}

/// The suite's small classifier: WRN-10-1, 3 epochs on 3,000 CIFAR-10 training images, scored
/// on 500 test images (seed 1); its `atop` arguments, without `--out`.
pub const SMALL_CLASSIFIER: &[&str] = &[
    "train",
    "classifier",
    "--dataset",
    "cifar10",
    "--arch",
    "wrn-10-1",
    "--epochs",
    "3",
    "--batch-size",
    "100",
    "--lr",
    "0.1",
    "--warmup-epochs",
    "0.5",
    "--train-subset",
    "3000",
    "--test-subset",
    "500",
    "--seed",
    "1",
];

/// The run folder of [`SMALL_CLASSIFIER`], trained once (a cached fixture). Read it, or copy it
/// ([`copy_tree`]) before changing it.
pub fn small_classifier() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        cached_fixture("small-classifier", &SMALL_CLASSIFIER.join(" "), |dir| {
            run_ok(
                atop()
                    .env("ATOP_DATA_DIR", data_dir())
                    .args(["--quiet", "--threads", "2"])
                    .args(SMALL_CLASSIFIER)
                    .arg("--out")
                    .arg(dir),
            );
        })
    })
}

/// Copies the folder `from` to the new folder `to`, recursively.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
