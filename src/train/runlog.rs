//! What every training run folder shares: `metrics.jsonl` (one JSON record per epoch, appended
//! and synced), trimming it back to the last complete checkpoint on resume, and committing a
//! checkpoint folder by pointing `last.json` at it and removing the older ones.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::models::checkpoint::{self, LastCheckpoint};

pub const METRICS: &str = "metrics.jsonl";
/// The settings a run was started with.
pub const CONFIG: &str = "config.json";

/// A metrics record that knows its (1-based) epoch.
pub trait EpochRecord: Serialize + DeserializeOwned {
    fn epoch(&self) -> usize;
}

pub fn append<T: Serialize>(run: &Path, record: &T) -> Result<()> {
    let path = run.join(METRICS);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(record)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn read<T: DeserializeOwned>(run: &Path) -> Result<Vec<T>> {
    let path = run.join(METRICS);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    records(&path, &text).map(|(_, r)| r).collect()
}

/// The non-empty lines of `text` (the metrics file at `path`), each with its parsed record or
/// an error naming the file and line.
fn records<'a, T: DeserializeOwned>(
    path: &'a Path,
    text: &'a str,
) -> impl Iterator<Item = (&'a str, Result<T>)> + 'a {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(move |(i, l)| {
            let r = serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not an epoch record", path.display(), i + 1));
            (l, r)
        })
}

/// After a crash, metrics may hold an epoch whose checkpoint never completed, or a torn last
/// line: drop them. The kept lines stay byte for byte (a parse and re-print of a float may
/// change its last digit), and a file with nothing to drop is not rewritten, so that resuming a
/// finished run changes no file.
pub fn keep_up_to<T: EpochRecord>(run: &Path, epoch: usize) -> Result<()> {
    let path = run.join(METRICS);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let parsed: Vec<(&str, Result<T>)> = records(&path, &text).collect();
    let torn_tail = !text.is_empty() && !text.ends_with('\n');
    let mut kept = Vec::with_capacity(parsed.len());
    let last = parsed.len();
    for (i, (line, record)) in parsed.into_iter().enumerate() {
        match record {
            Ok(m) if m.epoch() <= epoch => kept.push(line),
            Ok(_) => {}
            Err(_) if torn_tail && i + 1 == last => {}
            Err(e) => return Err(e),
        }
    }
    if kept.len() == last && !torn_tail {
        return Ok(());
    }
    crate::io::write_atomic(&path, |out| {
        for line in &kept {
            writeln!(out, "{line}")?;
        }
        Ok(())
    })
}

/// Makes the complete checkpoint folder `run/rel` the run's latest (`last.json`, written
/// atomically), then removes the other `checkpoints/epoch-*` folders. A crash at any point
/// leaves a complete checkpoint in use.
pub fn commit_checkpoint(
    run: &Path,
    rel: &str,
    epoch: usize,
    step: usize,
) -> Result<LastCheckpoint> {
    let last = LastCheckpoint {
        epoch,
        step,
        dir: rel.to_string(),
    };
    crate::io::write_json(&run.join(checkpoint::LAST), &last)?;
    for entry in std::fs::read_dir(run.join("checkpoints"))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("epoch-") && format!("checkpoints/{name}") != rel {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(last)
}

/// Refuses to start a new run in a folder that holds one, unless resuming.
pub fn check_fresh(run: &Path, config_file: &str, resume: bool) -> Result<()> {
    let has_run = run.join(checkpoint::LAST).exists() || run.join(config_file).exists();
    if has_run && !resume {
        anyhow::bail!(
            "{} already holds a training run: pass `resume` {} to continue it, or choose another `out`",
            run.display(),
            run.display()
        );
    }
    let foreign = std::fs::read_dir(run).ok().and_then(|entries| {
        entries.flatten().find(|e| {
            let name = e.file_name();
            name != crate::folder::LOCK && name != crate::folder::INPUTS
        })
    });
    if !has_run
        && !resume
        && let Some(entry) = foreign
    {
        anyhow::bail!(
            "{} holds {} and no training run: a new run starts in an empty or new folder (`out`)",
            run.display(),
            entry.file_name().to_string_lossy()
        );
    }
    Ok(())
}

/// Settings a resumed run may change, each recorded from the epoch it applies: its schedule
/// (`epochs`, learning rates). Settings that define what is trained (data, architecture,
/// losses and their weights, attacks, transforms) may not: the run's records would claim them
/// for epochs trained otherwise.
fn changeable(key: &str) -> bool {
    key == "epochs" || key == "lr" || key.ends_with(".lr")
}

/// `changes.json`: the settings changed on resume, each from the epoch it resumed after.
pub const CHANGES: &str = "changes.json";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub after_epoch: usize,
    pub setting: String,
    pub was: serde_json::Value,
    pub now: serde_json::Value,
}

/// Compares a resumed run's settings with those it was started with: a change of a
/// [`changeable`] setting is recorded in `changes.json` (from the epoch of the last checkpoint),
/// any other is an error naming the setting and both values.
pub fn check_settings(run: &Path, was: &serde_json::Value, now: &serde_json::Value) -> Result<()> {
    let mut diffs = Vec::new();
    diff("", was, now, &mut diffs);
    if diffs.is_empty() {
        return Ok(());
    }
    if let Some((key, a, b)) = diffs.iter().find(|(k, _, _)| !changeable(k)) {
        anyhow::bail!(
            "{}: `{key}` was {a} when the run started, now {b}: a resumed run keeps the settings that define what it trains (only `epochs` and learning rates may change); start a new run (another `out`) to train with other settings",
            run.display()
        );
    }
    let after_epoch = checkpoint::read_last(run).map_or(0, |l| l.epoch);
    let path = run.join(CHANGES);
    let mut changes: Vec<Change> =
        crate::io::read_json_opt(&path, "a run's changed settings")?.unwrap_or_default();
    for (key, a, b) in diffs {
        tracing::warn!(
            "{}: `{key}` {a} -> {b} from epoch {} on (recorded in {CHANGES})",
            run.display(),
            after_epoch + 1
        );
        changes.push(Change {
            after_epoch,
            setting: key,
            was: a,
            now: b,
        });
    }
    crate::io::write_json(&path, &changes)
}

/// Leaf differences between two JSON values as (dotted key, was, now).
fn diff(
    key: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
    out: &mut Vec<(String, serde_json::Value, serde_json::Value)>,
) {
    use serde_json::Value::Object;
    match (a, b) {
        (Object(x), Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = serde_json::Value::Null;
                let sub = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                diff(
                    &sub,
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a != b => out.push((key.to_string(), a.clone(), b.clone())),
        _ => {}
    }
}

/// The settings a run folder was started with (`config.json`), for `--resume`.
pub fn saved_config<T: DeserializeOwned>(run: &Path, what: &str) -> Result<T> {
    crate::io::read_json(
        &run.join(CONFIG),
        &format!("the settings of a training run ({what})"),
    )
}

/// A named preset from `presets` (name, TOML text), parsed.
pub fn preset<T: DeserializeOwned>(presets: &[(&str, &str)], name: &str, what: &str) -> Result<T> {
    let Some((_, text)) = presets.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = presets.iter().map(|(n, _)| *n).collect();
        anyhow::bail!("unknown preset '{name}': expected one of {names:?}");
    };
    toml::from_str(text)
        .with_context(|| format!("preset {name}: not a valid {what} training config"))
}

/// For a divergence error: which checkpoint is kept.
pub fn kept_checkpoint(run: &Path, last: Option<&LastCheckpoint>) -> String {
    match last {
        Some(l) => format!(
            "the last good checkpoint is {} (epoch {})",
            run.join(&l.dir).display(),
            l.epoch
        ),
        None => "no checkpoint was written yet".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize)]
    struct Rec {
        epoch: usize,
        loss: f64,
    }
    impl EpochRecord for Rec {
        fn epoch(&self) -> usize {
            self.epoch
        }
    }

    // Floats as serde_json printed them in a run whose resume rewrote them one digit off.
    const LINES: &str = "{\"epoch\":1,\"loss\":-0.09598488081246614}\n{\"epoch\":2,\"loss\":-0.009455913095735013}\n";

    #[test]
    fn resuming_a_finished_run_leaves_its_records_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS);
        std::fs::write(&path, LINES).unwrap();
        keep_up_to::<Rec>(dir.path(), 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), LINES);
        keep_up_to::<Rec>(dir.path(), 1).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            LINES.lines().next().unwrap().to_string() + "\n"
        );
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_a_bad_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS);
        std::fs::write(&path, format!("{LINES}{{\"epoch\":3,\"lo")).unwrap();
        keep_up_to::<Rec>(dir.path(), 3).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), LINES);
        std::fs::write(&path, format!("{{\"epoch\":1}}\n{LINES}")).unwrap();
        let err = format!("{:#}", keep_up_to::<Rec>(dir.path(), 3).unwrap_err());
        assert!(err.contains("line 1: not an epoch record"), "{err}");
    }
}
