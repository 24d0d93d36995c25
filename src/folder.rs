//! The one rule for run folders (trainers, evaluations, studies, purify, interpolation):
//!
//! - one writer at a time: [`lock`] takes `.lock` before the first write and holds it to the end;
//! - inputs are identified by content: [`Inputs`] records each input's SHA-256 (weights,
//!   descriptions, images, settings) in `inputs.json` at the start, and every resume or reuse
//!   compares them, naming the input that changed;
//! - completion is a recorded fact: [`Complete`] lists every promised output with its SHA-256 in
//!   `complete.json`, written last; a folder is finished only when every listed file is there
//!   and unchanged, and a rerun writes what is missing.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::io::hex;

pub use crate::io::LOCK;
pub const INPUTS: &str = "inputs.json";
pub const COMPLETE: &str = "complete.json";

/// An exclusive lock on a run folder for as long as this value lives. A folder in which nothing
/// was written while it was held (a refused command) is left as it was found: the lock file,
/// and the folder if the lock created it, are removed when it is dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    dir: PathBuf,
    created: bool,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let only_lock = std::fs::read_dir(&self.dir)
            .is_ok_and(|entries| entries.flatten().all(|e| e.file_name() == LOCK));
        if only_lock {
            let _ = std::fs::remove_file(self.dir.join(LOCK));
            if self.created {
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }
}

/// Creates `dir` and locks it: a second writer (another process, or another lock in this one)
/// is refused at once with an error naming the folder, instead of interleaving its files.
pub fn lock(dir: &Path) -> Result<Lock> {
    use std::os::unix::fs::MetadataExt;
    let created = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(LOCK);
    // A holder that wrote nothing removes the lock file as it ends: one locked just after it
    // may hold a file that is no longer the folder's, so the lock is taken again on the new one.
    for _ in 0..100 {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "{} is in use by another atop process (it holds {}): wait for it, or choose another `out`",
                dir.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        let current = std::fs::metadata(&path).map(|m| m.ino()).ok();
        if current == Some(file.metadata()?.ino()) {
            return Ok(Lock {
                _file: file,
                dir: dir.to_path_buf(),
                created,
            });
        }
    }
    bail!(
        "cannot lock {}: its lock file keeps changing",
        path.display()
    )
}

/// SHA-256 of a file's bytes, in hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    Ok(hex(&crate::io::digest_file::<sha2::Sha256>(path)?.1))
}

/// SHA-256 over every file of a checkpoint folder (names and bytes, sorted by name; `.lock`
/// and unfinished `.tmp` files left out): what identifies weights and their description.
pub fn folder_sha256(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK && !n.ends_with(".tmp"))
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for name in &names {
        h.update(name.as_bytes());
        h.update(file_sha256(&dir.join(name))?.as_bytes());
    }
    Ok(hex(&h.finalize()))
}

/// A path as recorded in a run folder: absolute (canonical where it exists), never relative to
/// the working directory of the command that wrote it.
pub fn absolute(path: &Path) -> PathBuf {
    use std::path::Component;
    let joined = match std::env::current_dir() {
        Ok(cwd) => cwd.join(path),
        Err(_) => return path.to_path_buf(),
    };
    // Lexically (`.` dropped, `..` applied), so that a folder is written the same before and
    // after it exists.
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// One input of a run: what it is, where it was read from, and its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub path: Option<PathBuf>,
    pub sha256: String,
}

/// `inputs.json`: a run's inputs by name (`classifier`, `purifier`, `data`, `settings`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs(pub BTreeMap<String, Input>);

impl Inputs {
    pub fn add(&mut self, name: &str, path: Option<&Path>, sha256: String) -> &mut Self {
        self.0.insert(
            name.to_string(),
            Input {
                path: path.map(absolute),
                sha256,
            },
        );
        self
    }

    /// Records these inputs in `dir` (a fresh run), or checks them against the recorded ones
    /// (a resumed or reused run): a changed input is an error naming it, its recorded path and
    /// both hashes. An input recorded but not given now, or given now but not recorded, is a
    /// change too.
    pub fn record_or_check(&self, dir: &Path) -> Result<()> {
        let path = dir.join(INPUTS);
        let Some(recorded) = crate::io::read_json_opt::<Inputs>(&path, "a run's recorded inputs")?
        else {
            return crate::io::write_json(&path, self);
        };
        for (name, was) in &recorded.0 {
            match self.0.get(name) {
                Some(now) if now.sha256 == was.sha256 => {}
                Some(now) => bail!(
                    "{}: its input `{name}` changed since the run started (recorded {} with SHA-256 {}, now {} with {}): a run continues only on the inputs it began with; start a new run for other inputs",
                    dir.display(),
                    shown(&was.path),
                    short(&was.sha256),
                    shown(&now.path),
                    short(&now.sha256)
                ),
                None => bail!(
                    "{}: the run was started with an input `{name}` ({}) that is not given now",
                    dir.display(),
                    shown(&was.path)
                ),
            }
        }
        if let Some(name) = self.0.keys().find(|k| !recorded.0.contains_key(*k)) {
            bail!(
                "{}: the input `{name}` was not part of this run when it started",
                dir.display()
            );
        }
        Ok(())
    }
}

fn shown(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "(no file)".into(), |p| p.display().to_string())
}

fn short(h: &str) -> &str {
    &h[..h.len().min(16)]
}

/// `complete.json`: every output a finished run promises, with its SHA-256 (relative paths).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    pub files: BTreeMap<String, String>,
}

impl Complete {
    /// Hashes `files` (relative to `dir`) and writes `complete.json` last: the run's record that
    /// it finished.
    pub fn write(dir: &Path, files: &[&str]) -> Result<()> {
        let mut done = Complete::default();
        for f in files {
            done.files
                .insert((*f).to_string(), file_sha256(&dir.join(f))?);
        }
        crate::io::write_json(&dir.join(COMPLETE), &done)
    }

    /// Whether `dir` holds a finished run: `complete.json` there and every file it lists present
    /// and unchanged. Err (naming the file) when a listed file was changed, Ok(false) when the
    /// record or a listed file is missing (a rerun writes it).
    pub fn verify(dir: &Path) -> Result<bool> {
        let Some(done) =
            crate::io::read_json_opt::<Complete>(&dir.join(COMPLETE), "a run's completion record")?
        else {
            return Ok(false);
        };
        for (name, hash) in &done.files {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(false);
            }
            if file_sha256(&path)? != *hash {
                bail!(
                    "{}: changed since the run finished (its SHA-256 differs from {}'s record): restore it, or delete {} to have it rewritten",
                    path.display(),
                    COMPLETE,
                    path.display()
                );
            }
        }
        Ok(true)
    }

    /// Removes the record (before a rerun rewrites the outputs).
    pub fn clear(dir: &Path) -> Result<()> {
        match std::fs::remove_file(dir.join(COMPLETE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", dir.join(COMPLETE).display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_folder_is_refused_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = lock(&dir).unwrap();
        let e = lock(&dir).unwrap_err().to_string();
        assert!(e.contains("in use by another atop process"), "{e}");
        drop(first);
        lock(&dir).unwrap();
    }

    #[test]
    fn a_changed_input_is_named_and_an_unchanged_one_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Inputs::default();
        a.add("classifier", Some(Path::new("/x/model")), "aa".into());
        a.record_or_check(tmp.path()).unwrap();
        a.record_or_check(tmp.path()).unwrap();
        let mut b = Inputs::default();
        b.add("classifier", Some(Path::new("/x/model")), "bb".into());
        let e = b.record_or_check(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("`classifier` changed"), "{e}");
        let mut c = a.clone();
        c.add("purifier", None, "cc".into());
        let e = c.record_or_check(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("`purifier` was not part"), "{e}");
    }

    #[test]
    fn completion_needs_every_listed_file_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert!(!Complete::verify(d).unwrap());
        std::fs::write(d.join("a.md"), "x").unwrap();
        std::fs::write(d.join("b.png"), "y").unwrap();
        Complete::write(d, &["a.md", "b.png"]).unwrap();
        assert!(Complete::verify(d).unwrap());
        std::fs::remove_file(d.join("b.png")).unwrap();
        assert!(!Complete::verify(d).unwrap());
        std::fs::write(d.join("b.png"), "y").unwrap();
        std::fs::write(d.join("a.md"), "edited").unwrap();
        let e = Complete::verify(d).unwrap_err().to_string();
        assert!(e.contains("a.md") && e.contains("changed"), "{e}");
    }
}
