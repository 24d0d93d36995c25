//! `atop eval clean` into a folder: a classifier's accuracy, per-class accuracy and confusion
//! matrix on a (seeded subset of a) split, optionally behind a random transform.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;

use crate::data::subset::seeded_subset;
use crate::data::{DatasetKind, ImageSet, Split};
use crate::figures::{grid, plot};
use crate::models::accuracy::{CleanReport, evaluate};
use crate::models::{Classifier, Model};
use crate::purifier::defended::{Defence, defended};
use crate::runtime::Precision;

/// How to evaluate.
pub struct CleanSettings {
    /// A seeded subset of this many images (all of them without).
    pub subset: Option<usize>,
    /// Seeds the subset and the transform's draws.
    pub seed: u64,
    pub batch_size: usize,
    pub precision: Precision,
    /// The transform (if any) in front of the classifier.
    pub defence: Defence,
}

/// What `eval clean` writes to its JSON file (and prints with `--json`).
#[derive(Serialize)]
pub struct CleanRun {
    pub model: PathBuf,
    /// What was evaluated: the classifier, or the transform in front of it.
    pub defence: String,
    pub dataset: String,
    pub split: Split,
    pub subset_seed: Option<u64>,
    pub subset_indices: Option<Vec<usize>>,
    #[serde(flatten)]
    pub report: CleanReport,
    pub classes: Vec<String>,
    pub json: PathBuf,
    pub confusion_png: PathBuf,
}

/// Evaluates `model` (from the checkpoint `dir`) on `data`, the `split` of `dataset`, and
/// writes `eval-clean-<tag>.json` and `confusion-<tag>.png` into `out` (the tag names the split
/// and any transform, so a plain evaluation's files keep their names). With `own_folder`, `out`
/// must hold nothing but such files (a folder of the user's); beside the model it is not checked.
pub fn clean_into(
    (dir, model): (&Path, &Classifier),
    (dataset, split, mut data): (DatasetKind, Split, ImageSet),
    s: &CleanSettings,
    (out, own_folder): (&Path, bool),
    device: tch::Device,
) -> Result<CleanRun> {
    let indices = match s.subset {
        Some(n) => {
            let idx = seeded_subset(data.len(), n, s.seed)?;
            data = data.select(&idx);
            Some(idx)
        }
        None => None,
    };
    let names = data.class_names.clone();
    let pipeline = defended(
        model,
        None,
        &s.defence,
        (data.height as i64, data.width as i64),
    )?;
    tch::manual_seed(s.seed as i64);
    let report = evaluate(&pipeline, Arc::new(data), s.batch_size, device, s.precision)?;
    let tag = match &pipeline.stages.first() {
        Some(stage) => format!(
            "{}-{}",
            split.as_str(),
            stage
                .describe()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                })
                .collect::<String>()
                .trim_matches('-')
        ),
        None => split.as_str().to_string(),
    };
    // Beside the model (the default) or in a folder of its own: never into another command's
    // results.
    if own_folder {
        crate::io::check_output_dir(out, &["eval-clean-*.json", "confusion-*.png"], "`out`")?;
    }
    // Beside a model that may be a training run's: wait for no trainer, refuse instead.
    let _lock = crate::folder::lock(out)?;
    let json = out.join(format!("eval-clean-{tag}.json"));
    let png = out.join(format!("confusion-{tag}.png"));
    grid::save_png(&plot::confusion_matrix(&report.confusion, &names), &png)?;
    let run = CleanRun {
        model: dir.to_path_buf(),
        defence: pipeline.describe(),
        dataset: dataset.as_str().into(),
        split,
        subset_seed: s.subset.map(|_| s.seed),
        subset_indices: indices,
        report,
        classes: names,
        json: json.clone(),
        confusion_png: png,
    };
    crate::io::write_json(&json, &run)?;
    Ok(run)
}
