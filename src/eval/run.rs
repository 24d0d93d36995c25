//! An evaluation run into a folder: the engine ([`super::robust`]) resumed from and saved to
//! `out`, a finished `results.json` read back, shards merged. Rendering the report is
//! `crate::report::robust`'s.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use tch::Tensor;

use super::robust::{RobustEvaluation, Target};

/// The file that holds a finished evaluation (written last).
pub const RESULTS: &str = "results.json";

/// Where the numbers came from.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Provenance {
    pub atop_version: String,
    pub torch_version: String,
    pub device: String,
    pub threads: usize,
    /// The CPU's model name and whether atop tuned glibc's allocator: both move the timings.
    /// (Absent from results written before 2026-12-03.)
    #[serde(default)]
    pub cpu: String,
    #[serde(default)]
    pub allocator_tuned: bool,
    /// The checkpoint and the defence in front of it.
    pub model: String,
    pub defence: String,
    pub data: String,
    pub started: String,
}

/// `results.json`: what `eval robust` writes and `eval merge` reads back.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RobustResults {
    pub provenance: Provenance,
    #[serde(flatten)]
    pub evaluation: RobustEvaluation,
}

/// One robust evaluation of `target` under `config` into `out` (`atop eval robust`, a study's
/// evaluations): resumes what `out` holds (per-batch state), or reads back a finished
/// `results.json` of the same settings. Writes no report: the caller renders the [`Run`]
/// (`crate::report::robust::write_run`), which writes `results.json` last.
pub fn evaluate_into(
    target: &super::target::Target,
    config: &super::robust::RobustConfig,
    shard: Option<super::robust::Shard>,
    out: &Path,
    device: tch::Device,
) -> Result<Run> {
    use super::robust::{Points, Surrogates, evaluate};
    use crate::models::Model;
    super::state::check_output_dir(out)?;
    let lock = crate::folder::lock(out)?;
    // A finished evaluation of this very model, data and settings is read back as it is (its
    // timings and provenance kept); the config holds the weights' and images' content hashes.
    // Finished means recorded complete (every output there and unchanged); otherwise the
    // engine resumes from its state and every output is written again.
    let path = out.join(RESULTS);
    if let Some(done) = crate::io::read_json_opt::<RobustResults>(&path, "robust results")?
        && done.evaluation.config == *config
        && done.evaluation.shard == shard
        && crate::folder::Complete::verify(out)?
    {
        super::state::validate(&done.evaluation, &path)?;
        return Ok(Run {
            results: done,
            x_adv: None,
            lock: Some(lock),
        });
    }
    let pipeline = target.model()?;
    config.validate()?;
    for spec in &config.attacks {
        config
            .settings
            .fit_model(spec.attack, pipeline.num_classes())?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = crate::io::utc_now();
    // Built only when asked for: without a defence stage it is an error naming the options.
    let wants_bpda = config.attacks.iter().any(|s| s.target == Target::Bpda);
    let bpda = if wants_bpda {
        Some(target.bpda_model()?)
    } else {
        None
    };
    let surrogates = Surrogates {
        classifier: Some(&target.classifier),
        bpda: bpda.as_ref().map(|m| m as &dyn Model),
    };
    let (evaluation, x_adv) = evaluate(
        &pipeline,
        surrogates,
        Points {
            x: &target.x,
            y: &target.y,
            indices: &target.indices,
        },
        config,
        shard,
        Some(out),
    )?;
    // The outputs are written again next (by the caller): the folder is not finished until
    // they all are. Not earlier: a run refused above (other settings) leaves a finished
    // folder as it was.
    crate::folder::Complete::clear(out)?;
    let engine = crate::runtime::engine_info();
    let provenance = Provenance {
        atop_version: engine.atop_version.into(),
        torch_version: engine.torch_version.into(),
        device: format!("{device:?}"),
        threads: engine.threads,
        cpu: engine.cpu,
        allocator_tuned: engine.allocator_tuned,
        model: target.dir.display().to_string(),
        defence: pipeline.describe(),
        data: target.data.clone(),
        started,
    };
    let results = RobustResults {
        provenance,
        evaluation,
    };
    Ok(Run {
        results,
        x_adv: Some(x_adv),
        lock: Some(lock),
    })
}

/// Reads the `results.json` of a finished evaluation (or shard) in `dir`: recorded complete
/// (every output there, unchanged) and consistent with its records ([`super::state::validate`]).
pub fn read_results(dir: &Path) -> Result<RobustResults> {
    let path = dir.join(RESULTS);
    let results: RobustResults = crate::io::read_json(
        &path,
        "the results of a finished atop eval robust (or shard)",
    )?;
    if !crate::folder::Complete::verify(dir)? {
        anyhow::bail!(
            "{}: not a finished evaluation ({} missing, or an output it lists): finish it first (rerun the same atop eval robust)",
            dir.display(),
            crate::folder::COMPLETE
        );
    }
    super::state::validate(&results.evaluation, &path)?;
    Ok(results)
}

/// The shards' results as one evaluation, with the first shard's provenance; each shard read
/// with [`read_results`] (finished, validated).
pub fn merge_results(dirs: &[PathBuf]) -> Result<RobustResults> {
    let mut parts = Vec::new();
    let mut provenance = None;
    for dir in dirs {
        let r = read_results(dir)?;
        provenance.get_or_insert(r.provenance);
        parts.push(r.evaluation);
    }
    let evaluation = super::state::merge(parts)?;
    Ok(RobustResults {
        provenance: provenance.context("no shard given")?,
        evaluation,
    })
}

/// What [`evaluate_into`] returns.
pub struct Run {
    pub results: RobustResults,
    /// The adversarial images (one tensor per attack, points in record order) when this call
    /// computed the evaluation; None when it read back a finished one.
    pub x_adv: Option<Vec<Tensor>>,
    /// The folder's lock, held until the caller has written the outputs.
    pub lock: Option<crate::folder::Lock>,
}

/// Writes `results.json` into `out` atomically; returns its path.
pub fn write_results_json(out: &Path, results: &RobustResults) -> Result<PathBuf> {
    let path = out.join(RESULTS);
    crate::io::write_json(&path, results)?;
    Ok(path)
}
