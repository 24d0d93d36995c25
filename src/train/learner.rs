//! The one training loop every trainer runs on (after burn-train's `Learner`): it owns the run
//! folder (a lock, `config.json`, `metrics.jsonl`, checkpoint commits behind `last.json`),
//! resuming, the epoch loop with its progress bar, the NaN guard and the per-epoch log line.
//! Each trainer supplies a [`Task`]: its step, its evaluation, its state.
//!
//! Run folder:
//!   config.json              the effective settings
//!   .lock                    held while a process trains in the folder
//!   checkpoints/epoch-NNNN/  the task's files, complete before `last.json` points at them
//!   last.json                the latest complete checkpoint
//!   metrics.jsonl            one record per epoch

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::runlog::{self, CONFIG, EpochRecord};
use crate::models::checkpoint::{self, LastCheckpoint};

/// The loss terms of a step (named fields); summed over an epoch, weighted by batch size.
pub trait Losses: Default + Clone {
    /// Every term with its name, in a fixed order (the NaN guard names the culprit).
    fn terms(&self) -> Vec<(&'static str, f64)>;
    /// `self += other * weight`, term by term.
    fn add(&mut self, other: &Self, weight: f64);
    /// Every term times `factor`.
    fn scaled(&self, factor: f64) -> Self {
        let mut out = Self::default();
        out.add(self, factor);
        out
    }
}

/// Declares a struct of named `f64` loss terms implementing [`Losses`].
#[macro_export]
macro_rules! losses {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($(#[$fmeta:meta])* $field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        $vis struct $name {
            $($(#[$fmeta])* pub $field: f64),*
        }
        impl $crate::train::learner::Losses for $name {
            fn terms(&self) -> Vec<(&'static str, f64)> {
                vec![$((stringify!($field), self.$field)),*]
            }
            fn add(&mut self, other: &Self, weight: f64) {
                $(self.$field += other.$field * weight;)*
            }
        }
    };
}

/// Where one step sits in the run.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// 0-based epoch and batch within it.
    pub epoch: usize,
    pub index: usize,
    /// 0-based step over the whole run, and the run's total.
    pub global: usize,
    pub total: usize,
}

/// What an epoch's steps produced, for the task's evaluation.
#[derive(Debug, Clone)]
pub struct EpochSummary<L> {
    /// 1-based.
    pub epoch: usize,
    /// Mean loss terms per image.
    pub losses: L,
    pub images: usize,
    /// Training images per second (steps only).
    pub img_per_s: f64,
    /// When the epoch started (the task adds its evaluation time).
    pub started: Instant,
}

/// One kind of training: a classifier, a purifier, AToP fine-tuning.
pub trait Task {
    type Losses: Losses;
    /// One line of `metrics.jsonl`.
    type Record: EpochRecord + Clone + std::fmt::Debug;

    fn epochs(&self) -> usize;
    fn steps_per_epoch(&self) -> usize;
    /// Before the first step of each epoch (0-based), e.g. reseeding the transforms so that a
    /// resumed run draws what an uninterrupted one would.
    fn begin_epoch(&mut self, _epoch: usize) {}
    /// One optimizer step on batch `step.index` of the epoch: its loss terms and image count.
    /// The loop stops the run if a term is not finite; the task does not save anything here.
    fn step(&mut self, step: Step) -> Result<(Self::Losses, usize)>;
    /// After a step (e.g. sample grids every N steps).
    fn after_step(&mut self, _run: &Path, _step: Step) -> Result<()> {
        Ok(())
    }
    /// A short progress message from the epoch's running means.
    fn progress(&self, _means: &Self::Losses) -> String {
        String::new()
    }
    /// After an epoch's steps: evaluation and its record.
    fn end_epoch(
        &mut self,
        run: &Path,
        summary: EpochSummary<Self::Losses>,
    ) -> Result<Self::Record>;
    /// The log line for a record.
    fn describe(&self, record: &Self::Record) -> String;
    /// Writes a complete checkpoint (weights, optimizer states, descriptions) into `dir`; the
    /// loop commits it afterwards.
    fn save(&self, dir: &Path, epoch: usize, step: usize) -> Result<()>;
    /// Loads the state saved by [`Task::save`].
    fn restore(&mut self, dir: &Path) -> Result<()>;
    /// After the last epoch, or when a finished run is resumed (e.g. curves).
    fn finish(&mut self, _run: &Path) -> Result<()> {
        Ok(())
    }
    /// What the divergence error advises.
    fn divergence_hint(&self) -> &'static str {
        "Lower the learning rate."
    }
}

/// What a run did.
#[derive(Debug, Serialize)]
pub struct Fitted<R> {
    pub run: PathBuf,
    pub epochs: usize,
    pub resumed_from_epoch: Option<usize>,
    /// The last epoch's record (from `metrics.jsonl` when no epoch ran).
    pub last: Option<R>,
    pub seconds: f64,
    pub checkpoint: PathBuf,
}

/// A run folder: checked before the task loads anything (a folder that holds a run is never
/// started afresh), created once it has loaded (a run that cannot start leaves no folder to
/// block its retry).
pub struct RunFolder {
    path: PathBuf,
    resume: bool,
    /// Held from the check of the folder to the end of the run.
    _lock: crate::folder::Lock,
}

impl RunFolder {
    /// Refuses a folder that holds a training run unless resuming, and a resume of a folder
    /// without one.
    pub fn open(path: &Path, resume: bool) -> Result<Self> {
        if resume && !path.is_dir() {
            bail!("`resume` {}: no such run folder", path.display());
        }
        // Checked before the lock writes anything (a refused folder is left as it was), and
        // again under it.
        runlog::check_fresh(path, CONFIG, resume)?;
        let lock = crate::folder::lock(path)?;
        runlog::check_fresh(path, CONFIG, resume)?;
        Ok(RunFolder {
            path: path.to_path_buf(),
            resume,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn resume(&self) -> bool {
        self.resume
    }

    /// Whether there is a checkpoint to resume from.
    pub fn has_checkpoint(&self) -> bool {
        self.resume && self.path.join(checkpoint::LAST).exists()
    }

    /// Checks a resumed run's settings, inputs and finished outputs against its records, then
    /// records them (see [`RunFolder::fit`]).
    fn record(&self, config: &impl Serialize, inputs: &crate::folder::Inputs) -> Result<()> {
        let run = &self.path;
        let config = serde_json::to_value(config).context("cannot serialise the settings")?;
        if self.resume && run.join(CONFIG).exists() {
            let was: serde_json::Value =
                crate::io::read_json(&run.join(CONFIG), "the settings the run was started with")?;
            runlog::check_settings(run, &was, &config)?;
        }
        inputs.record_or_check(run)?;
        // A finished run's outputs must be those it recorded (an edited checkpoint is refused
        // by name); one that trains further is finished again only at its new end.
        crate::folder::Complete::verify(run)?;
        crate::folder::Complete::clear(run)?;
        // The effective settings, also on resume (a run extended with `epochs` continues to
        // the new end when it is resumed again).
        crate::io::write_json(&run.join(CONFIG), &config)
    }

    /// Trains `task` in this folder, `config` being its settings (written as `config.json`)
    /// and `inputs` what it reads (recorded at the start, checked on every resume: a run
    /// continues only on the weights and images it began with, and with its settings; only
    /// `epochs` may change, recorded as a change from the epoch it resumes after).
    pub fn fit<T: Task>(
        &self,
        config: &impl Serialize,
        inputs: &crate::folder::Inputs,
        task: &mut T,
    ) -> Result<Fitted<T::Record>> {
        let run = &self.path;
        self.record(config, inputs)?;
        let epochs = task.epochs();
        let steps_per_epoch = task.steps_per_epoch();
        if steps_per_epoch == 0 {
            bail!("an epoch has no steps: the batch is larger than the training set");
        }
        let mut start_epoch = 0;
        let mut last: Option<LastCheckpoint> = None;
        if self.has_checkpoint() {
            let l = checkpoint::read_last(run)?;
            task.restore(&run.join(&l.dir))?;
            start_epoch = l.epoch;
            tracing::info!("resuming {} after epoch {}", run.display(), l.epoch);
            last = Some(l);
        }
        if self.resume {
            // A crash may have left the record of an epoch whose checkpoint never completed.
            runlog::keep_up_to::<T::Record>(run, start_epoch)?;
        }
        let resumed_from_epoch = last.as_ref().map(|l| l.epoch);
        let total = epochs * steps_per_epoch;
        let started = Instant::now();
        let mut last_record = None;
        for epoch in start_epoch..epochs {
            let t = Instant::now();
            task.begin_epoch(epoch);
            let bar = crate::progress::bar(
                steps_per_epoch as u64,
                &format!("epoch {}/{epochs}", epoch + 1),
            );
            let mut sums = T::Losses::default();
            let mut seen = 0usize;
            for index in 0..steps_per_epoch {
                let step = Step {
                    epoch,
                    index,
                    global: epoch * steps_per_epoch + index,
                    total,
                };
                let (losses, n) = task.step(step)?;
                if let Some((name, value)) =
                    losses.terms().into_iter().find(|(_, v)| !v.is_finite())
                {
                    let all: Vec<String> = losses
                        .terms()
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    bail!(
                        "training diverged at epoch {} step {} (global step {}): {name} is {value} ({}); {}. {}",
                        epoch + 1,
                        index + 1,
                        step.global,
                        all.join(", "),
                        runlog::kept_checkpoint(run, last.as_ref()),
                        task.divergence_hint()
                    );
                }
                sums.add(&losses, n as f64);
                seen += n;
                bar.inc(1);
                if index % 10 == 0 {
                    let msg = task.progress(&sums.scaled(1.0 / seen.max(1) as f64));
                    bar.set_message(format!(
                        "epoch {}/{epochs} {msg} {:.0} img/s",
                        epoch + 1,
                        seen as f64 / t.elapsed().as_secs_f64()
                    ));
                }
                task.after_step(run, step)?;
            }
            bar.finish_and_clear();
            let summary = EpochSummary {
                epoch: epoch + 1,
                losses: sums.scaled(1.0 / seen.max(1) as f64),
                images: seen,
                img_per_s: seen as f64 / t.elapsed().as_secs_f64(),
                started: t,
            };
            let record = task.end_epoch(run, summary)?;
            tracing::info!("epoch {}/{epochs} {}", epoch + 1, task.describe(&record));
            runlog::append(run, &record)?;
            let rel = format!("checkpoints/epoch-{:04}", epoch + 1);
            let step = (epoch + 1) * steps_per_epoch;
            task.save(&run.join(&rel), epoch + 1, step)?;
            last = Some(runlog::commit_checkpoint(run, &rel, epoch + 1, step)?);
            last_record = Some(record);
        }
        task.finish(run)?;
        let Some(last) = last else {
            bail!("{}: no epoch ran and there is no checkpoint", run.display());
        };
        complete(run, &last.dir)?;
        Ok(Fitted {
            run: run.clone(),
            epochs,
            resumed_from_epoch,
            last: last_record.or_else(|| {
                runlog::read::<T::Record>(run)
                    .ok()
                    .and_then(|m| m.into_iter().last())
            }),
            seconds: started.elapsed().as_secs_f64(),
            checkpoint: run.join(&last.dir),
        })
    }
}

/// Records a finished run: its settings, inputs, records, last checkpoint's files and curves.
fn complete(run: &Path, checkpoint_dir: &str) -> Result<()> {
    let mut files: Vec<String> = vec![
        CONFIG.into(),
        crate::folder::INPUTS.into(),
        runlog::METRICS.into(),
        checkpoint::LAST.into(),
    ];
    if run.join("curves.png").exists() {
        files.push("curves.png".into());
    }
    let dir = run.join(checkpoint_dir);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| format!("{checkpoint_dir}/{}", e.file_name().to_string_lossy()))
        .filter(|n| !n.ends_with(".tmp"))
        .collect();
    names.sort();
    files.extend(names);
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    crate::folder::Complete::write(run, &refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_folder_takes_one_trainer_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = RunFolder::open(dir.path(), false).unwrap();
        let err = RunFolder::open(dir.path(), false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("in use by another atop process"), "{err}");
        drop(held);
        assert!(
            RunFolder::open(dir.path(), false).is_ok(),
            "the lock outlived its holder"
        );
    }

    crate::losses! {
        struct Two { a, b }
    }

    #[test]
    fn loss_terms_are_named_and_summed_by_weight() {
        let mut sum = Two::default();
        sum.add(&Two { a: 1.0, b: 2.0 }, 3.0);
        sum.add(
            &Two {
                a: 0.5,
                b: f64::NAN,
            },
            1.0,
        );
        assert_eq!(sum.a, 3.5);
        assert_eq!(sum.scaled(2.0).a, 7.0);
        let terms = sum.terms();
        assert_eq!(terms[0], ("a", 3.5));
        assert_eq!(terms[1].0, "b");
        assert!(terms[1].1.is_nan());
    }
}
