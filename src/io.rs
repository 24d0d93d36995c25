//! Writing result files so that a crash never leaves a half-written one behind, and reading
//! the state files back.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};

/// Creates `path`'s parent folder and returns `<path>.tmp`.
fn prepare_tmp(path: &Path) -> Result<std::path::PathBuf> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    Ok(std::path::PathBuf::from(tmp))
}

/// Writes `path` via `<path>.tmp` + fsync + rename, creating the parent folder.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let tmp = prepare_tmp(path)?;
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut out = BufWriter::new(file);
    let result = write(&mut out).and_then(|_| {
        out.flush()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        out.get_ref()
            .sync_all()
            .with_context(|| format!("cannot write {}", tmp.display()))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// Writes pretty JSON atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_atomic(path, |out| {
        serde_json::to_writer_pretty(&mut *out, value).context("cannot serialise JSON")?;
        out.write_all(b"\n").context("cannot write JSON")
    })
}

/// Writes named tensors as safetensors via `<path>.tmp` + rename.
pub fn write_safetensors(path: &Path, tensors: &[(String, tch::Tensor)]) -> Result<()> {
    let tmp = prepare_tmp(path)?;
    let contiguous: Vec<(String, tch::Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.contiguous()))
        .collect();
    tch::Tensor::write_safetensors(&contiguous, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// Reads `path` as JSON of type T if the file exists (None otherwise); `what` names the expected
/// content in the error.
pub fn read_json_opt<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{}: not {what}", path.display()))
}
