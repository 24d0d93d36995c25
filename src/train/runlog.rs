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
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not an epoch record", path.display(), i + 1))
        })
        .collect()
}

/// After a crash, metrics may hold an epoch whose checkpoint never completed: drop it.
pub fn keep_up_to<T: EpochRecord>(run: &Path, epoch: usize) -> Result<()> {
    let kept: Vec<T> = read::<T>(run)?
        .into_iter()
        .filter(|m| m.epoch() <= epoch)
        .collect();
    crate::io::write_atomic(&run.join(METRICS), |out| {
        for m in &kept {
            writeln!(out, "{}", serde_json::to_string(m)?)?;
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
    if !has_run
        && !resume
        && let Ok(mut entries) = std::fs::read_dir(run)
        && let Some(Ok(entry)) = entries.next()
    {
        anyhow::bail!(
            "{} holds {} and no training run: a new run starts in an empty or new folder (`out`)",
            run.display(),
            entry.file_name().to_string_lossy()
        );
    }
    Ok(())
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
