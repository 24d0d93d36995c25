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

/// Reads `path` as JSON of type T; `what` names the expected content in the errors.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (expected {what})", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not {what}", path.display()))
}

/// [`read_json`] if the file exists (None otherwise).
pub fn read_json_opt<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    read_json(path, what).map(Some)
}

/// Bytes as lowercase hexadecimal (digests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The byte count and digest of a file, read in 1 MiB blocks (any `Digest`: MD5, SHA-256).
pub fn digest_file<D: sha2::Digest>(path: &Path) -> Result<(u64, Vec<u8>)> {
    use std::io::Read;
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hasher.finalize().to_vec()))
}

/// The lock file of a run folder (see `crate::folder::lock`): every writer's own.
pub const LOCK: &str = ".lock";

/// Refuses an output folder that holds anything but `own` entries (the names this command
/// writes, `*` matching any run of characters; a `/`-suffixed name is a folder): a command
/// never writes into another command's results, a checkpoint or its own inputs. A missing or
/// empty folder is fine; one holding only the command's own earlier outputs is redone. A
/// `<own>.tmp` file is the remnant of a write that a kill interrupted (see `write_atomic`): the
/// next write of that name truncates it, so it counts as the command's own.
pub fn check_output_dir(dir: &Path, own: &[&str], flag: &str) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => anyhow::bail!("{flag} {}: cannot read the folder: {e}", dir.display()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LOCK {
            continue;
        }
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let unfinished = name.strip_suffix(".tmp");
        let mine = own.iter().any(|pattern| match pattern.strip_suffix('/') {
            Some(folder) => is_dir && glob_match(folder, &name),
            None => {
                !is_dir
                    && (glob_match(pattern, &name)
                        || unfinished.is_some_and(|base| glob_match(pattern, base)))
            }
        });
        if !mine {
            anyhow::bail!(
                "{flag} {}: the folder holds {name}, which this command did not write; choose an empty or new folder",
                dir.display()
            );
        }
    }
    Ok(())
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.len() >= head.len()
                && name.starts_with(head)
                && (0..=name.len() - head.len()).any(|i| {
                    name.is_char_boundary(head.len() + i)
                        && glob_match(tail, &name[head.len() + i..])
                })
        }
    }
}

/// A short content hash (SHA-256, first 16 hex digits) of tensors and text: what resume state
/// is keyed by, so that swapped weights or other images never continue an earlier run.
pub fn fingerprint(tensors: &[&tch::Tensor], text: &str) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    for t in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        h.update(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
        let mut buf = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut buf, t.numel())
            .context("cannot read a tensor's bytes for its fingerprint")?;
        h.update(&buf);
    }
    let digest = h.finalize();
    Ok(hex(&digest[..8]))
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days; no date crate for one field).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod output_dir_tests {
    use super::*;

    #[test]
    fn output_folders_hold_only_the_commands_own_files() {
        assert!(glob_match("grid-*.png", "grid-rt2.png"));
        assert!(glob_match("*", "x"));
        assert!(!glob_match("grid-*.png", "grid-rt2.jpg"));
        assert!(!glob_match("results.json", "results.json.bak"));
        let tmp = tempfile::tempdir().unwrap();
        let own = ["results.json", "grid-*.png", "batches/"];
        assert!(check_output_dir(&tmp.path().join("missing"), &own, "--out").is_ok());
        assert!(check_output_dir(tmp.path(), &own, "--out").is_ok());
        std::fs::write(tmp.path().join("results.json"), "{}").unwrap();
        std::fs::write(tmp.path().join("grid-rt1.png"), "").unwrap();
        std::fs::create_dir(tmp.path().join("batches")).unwrap();
        assert!(check_output_dir(tmp.path(), &own, "--out").is_ok());
        std::fs::write(tmp.path().join("sentinel.txt"), "x").unwrap();
        let e = check_output_dir(tmp.path(), &own, "--out").unwrap_err();
        assert!(e.to_string().contains("sentinel.txt"), "{e}");
        std::fs::remove_file(tmp.path().join("sentinel.txt")).unwrap();
        // What a kill during an atomic write leaves is the command's own; other .tmp files are not.
        std::fs::write(tmp.path().join("results.json.tmp"), "{").unwrap();
        assert!(check_output_dir(tmp.path(), &own, "--out").is_ok());
        std::fs::write(tmp.path().join("notes.txt.tmp"), "x").unwrap();
        assert!(check_output_dir(tmp.path(), &own, "--out").is_err());
        std::fs::remove_file(tmp.path().join("notes.txt.tmp")).unwrap();
        std::fs::create_dir(tmp.path().join("grid-x.png")).unwrap();
        assert!(check_output_dir(tmp.path(), &own, "--out").is_err());
    }
}
