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
    dir
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

/// Runs an `atop` command that must succeed (its stderr is shown if not) and parses its JSON stdout.
pub fn run_json(cmd: &mut std::process::Command) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
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
