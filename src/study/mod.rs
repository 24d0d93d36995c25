//! `atop run`: one command from data to a report. A study trains (or takes) a classifier,
//! pre-trains (or takes) a purifier, fine-tunes that purifier with AToP, then attacks both
//! defended models, classifier(pre-trained purifier(t(x))) and classifier(AToP purifier(t(x))),
//! with the same whole-model attacks on the same seeded points and budgets (`eval robust`:
//! exact gradients, EOT, R draws per image, intervals), and writes one report comparing them.
//!
//! Study folder:
//!   study.json                  the resolved settings of every stage; a rerun must match them
//!   classifier/ purifier/ atop/ the training runs (none for a stage given as a checkpoint)
//!   eval/<pipeline>-<eps>/      one `eval robust` per defended model and budget
//!   report.md, summary.json     the comparison, written last
//!
//! Rerunning the same command resumes: finished stages are kept, an interrupted training or
//! evaluation continues from its last checkpoint or batch.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::attacks::{AttackSettings, Budget, Norm, parse_eps};
use crate::eval::compare::{Comparison, eps_label};
use crate::eval::defaults;
use crate::eval::plan::Plan;
use crate::eval::robust::{RobustConfig, Scores, parse_attacks};
use crate::eval::target::{ModelData, TargetSpec};
use crate::models::checkpoint;
use crate::train::atop::TrainAtopConfig;
use crate::train::classifier::TrainClassifierConfig;
use crate::train::purifier::TrainPurifierConfig;
use crate::train::runlog;

/// The named studies (TOML files `presets/run-*.toml`, compiled in).
pub const PRESETS: &[(&str, &str)] = &[
    (
        "cpu-15min",
        include_str!("../../presets/run-cpu-15min.toml"),
    ),
    (
        "cpu-study",
        include_str!("../../presets/run-cpu-study.toml"),
    ),
    (
        "paper-gpu",
        include_str!("../../presets/run-paper-gpu.toml"),
    ),
];

/// A study as written in its TOML file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    /// What the study is for, in words (the report's first line).
    pub description: String,
    pub classifier: StageSource,
    pub purifier: StageSource,
    pub atop: StageSource,
    pub eval: StudyEval,
}

/// Where a stage's model comes from: trained from a trainer preset with settings on top, or
/// an existing checkpoint used as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSource {
    /// The trainer's preset (`atop train classifier|purifier|atop --preset`).
    pub preset: Option<String>,
    /// A checkpoint folder or training run to use instead of training one.
    pub checkpoint: Option<PathBuf>,
    /// Settings over the preset, in the trainer's TOML keys; tables merge key by key.
    #[serde(default)]
    pub set: toml::Table,
}

/// The evaluation of both defended models: a plan's attacks and counts, or these fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyEval {
    /// An evaluation plan (`eval-robust-cpu`, `eval-robust-full`): it sets the attacks, their
    /// iterations and EOT, n, the draws and the check points.
    pub plan: Option<String>,
    /// Attack names as for `eval robust --attack` (default [`crate::eval::defaults::STUDY_ATTACKS`]).
    pub attacks: Option<Vec<String>>,
    /// Linf budgets, each a number or a fraction such as "8/255".
    pub eps: Vec<String>,
    /// Iterations of every attack (default: each attack's reference default).
    pub steps: Option<usize>,
    /// Gradient samples per step (EOT; default [`crate::eval::defaults::STUDY_EOT`]).
    pub eot: Option<usize>,
    /// Seeded test points.
    pub n: Option<usize>,
    /// R: draws of the model per scored image.
    pub draws: Option<usize>,
    /// Points for the sanity checks that run PGD themselves (0: none).
    pub check_points: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
}

fn default_eval_batch() -> usize {
    crate::eval::defaults::BATCH_SIZE
}

impl StudyConfig {
    pub fn preset(name: &str) -> Result<StudyConfig> {
        let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            bail!(
                "unknown study '{name}': expected one of {}",
                names.join(", ")
            );
        };
        Self::from_toml(text, &format!("study preset {name}"))
    }

    /// A study from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<StudyConfig> {
        toml::from_str(text).with_context(|| {
            format!("{origin}: not a valid study (see presets/run-cpu-15min.toml)")
        })
    }

    pub fn from_file(path: &Path) -> Result<StudyConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }
}

/// A stage resolved: the trainer's whole config, or the checkpoint given.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage<T> {
    Train(Box<T>),
    Given(PathBuf),
}

/// The evaluation resolved: per budget, the attacks and their settings.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPlan {
    pub budgets: Vec<(f64, String)>,
    pub attacks: String,
    pub n: usize,
    pub draws: usize,
    pub check_points: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub plan: Option<Plan>,
    pub steps: Option<usize>,
    pub eot: usize,
}

/// Everything a study runs, resolved and validated before its first step; `study.json`.
#[derive(Debug, Clone, Serialize)]
pub struct StudyPlan {
    pub description: String,
    pub classifier: Stage<TrainClassifierConfig>,
    pub purifier: Stage<TrainPurifierConfig>,
    pub atop: Stage<TrainAtopConfig>,
    pub eval: EvalPlan,
}

/// The preset's TOML with `set` merged in, key by key through tables.
fn merged<T: serde::de::DeserializeOwned>(
    stage: &str,
    source: &StageSource,
    presets: &[(&str, &str)],
) -> Result<T> {
    let name = source
        .preset
        .as_deref()
        .with_context(|| format!("[{stage}]: give a preset (a trainer preset) or a checkpoint"))?;
    let Some((_, text)) = presets.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = presets.iter().map(|(n, _)| *n).collect();
        bail!("[{stage}] preset = \"{name}\": expected one of {names:?}");
    };
    let mut table: toml::Table = toml::from_str(text).context("a compiled-in preset")?;
    merge(&mut table, &source.set);
    toml::Value::Table(table).try_into().with_context(|| {
        format!("[{stage}]: preset {name} with [{stage}.set] is not a valid config")
    })
}

fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The stage's source, checked: a preset or a checkpoint, not both, and `set` only with a preset.
fn source_kind(stage: &str, s: &StageSource) -> Result<Option<PathBuf>> {
    match (&s.preset, &s.checkpoint) {
        (Some(_), Some(_)) => {
            bail!("[{stage}]: give a preset or a checkpoint, not both")
        }
        (None, Some(c)) if !s.set.is_empty() => bail!(
            "[{stage}]: settings ([{stage}.set]) apply to a trained stage; {} is used as it is",
            c.display()
        ),
        (None, Some(c)) if !c.exists() => bail!(
            "[{stage}] checkpoint = \"{}\": no such file or folder",
            c.display()
        ),
        (None, Some(c)) => Ok(Some(c.clone())),
        (_, None) => Ok(None),
    }
}

/// Keys the study sets itself: a stage's inputs are the earlier stages' outputs.
fn refuse_keys(stage: &str, s: &StageSource, keys: &[&str]) -> Result<()> {
    if let Some(k) = keys.iter().find(|k| s.set.contains_key(**k)) {
        bail!("[{stage}.set] {k}: the study sets it (the earlier stage's output); drop it");
    }
    Ok(())
}

impl StudyPlan {
    /// Resolves `cfg` for the study folder `out`; every setting is validated here.
    pub fn new(cfg: &StudyConfig, out: &Path) -> Result<StudyPlan> {
        let classifier = match source_kind("classifier", &cfg.classifier)? {
            Some(c) => Stage::Given(c),
            None => {
                let c: TrainClassifierConfig = merged(
                    "classifier",
                    &cfg.classifier,
                    crate::train::classifier::PRESETS,
                )?;
                c.validate().context("[classifier]")?;
                Stage::Train(Box::new(c))
            }
        };
        let classifier_path = classifier.model(out, "classifier");
        let purifier = match source_kind("purifier", &cfg.purifier)? {
            Some(c) => Stage::Given(c),
            None => {
                refuse_keys("purifier", &cfg.purifier, &["classifier"])?;
                let mut c: TrainPurifierConfig =
                    merged("purifier", &cfg.purifier, crate::train::purifier::PRESETS)?;
                c.classifier = Some(classifier_path.clone());
                c.validate().context("[purifier]")?;
                Stage::Train(Box::new(c))
            }
        };
        let purifier_path = purifier.model(out, "purifier");
        let atop = match source_kind("atop", &cfg.atop)? {
            Some(c) => Stage::Given(c),
            None => {
                refuse_keys("atop", &cfg.atop, &["classifier", "purifier"])?;
                let mut c: TrainAtopConfig =
                    merged("atop", &cfg.atop, crate::train::atop::PRESETS)?;
                c.classifier = Some(classifier_path);
                c.purifier = Some(purifier_path);
                c.validate().context("[atop]")?;
                Stage::Train(Box::new(c))
            }
        };
        Ok(StudyPlan {
            description: cfg.description.clone(),
            classifier,
            purifier,
            atop,
            eval: EvalPlan::new(&cfg.eval)?,
        })
    }

    /// The classifier, the pre-trained and the fine-tuned purifier this study evaluates.
    fn models(&self, out: &Path) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.classifier.model(out, "classifier"),
            self.purifier.model(out, "purifier"),
            self.atop.model(out, "atop"),
        )
    }
}

impl<T> Stage<T> {
    /// The stage's model: the checkpoint given, or the run folder `out/name` it trains.
    fn model(&self, out: &Path, name: &str) -> PathBuf {
        match self {
            Stage::Given(p) => p.clone(),
            Stage::Train(_) => out.join(name),
        }
    }
}

impl EvalPlan {
    fn new(e: &StudyEval) -> Result<EvalPlan> {
        if e.eps.is_empty() {
            bail!("[eval] eps = []: give at least one Linf budget, e.g. [\"8/255\"]");
        }
        let mut budgets = Vec::new();
        for s in &e.eps {
            let eps = parse_eps(s).map_err(|err| anyhow::anyhow!("[eval] eps \"{s}\": {err}"))?;
            Budget::new(Norm::Linf, eps).with_context(|| format!("[eval] eps \"{s}\""))?;
            budgets.push((eps, eps_label(eps)));
        }
        let plan = match &e.plan {
            Some(name) => {
                if let Some(field) = [
                    ("attacks", e.attacks.is_some()),
                    ("steps", e.steps.is_some()),
                    ("eot", e.eot.is_some()),
                    ("n", e.n.is_some()),
                    ("draws", e.draws.is_some()),
                    ("check_points", e.check_points.is_some()),
                ]
                .iter()
                .find(|(_, set)| *set)
                {
                    bail!(
                        "[eval] {}: the plan {name} sets it; drop one of the two",
                        field.0
                    );
                }
                Some(Plan::preset(name).context("[eval] plan")?)
            }
            None => None,
        };
        let p = plan.as_ref();
        let ev = EvalPlan {
            budgets,
            attacks: e
                .attacks
                .as_ref()
                .map_or_else(|| defaults::STUDY_ATTACKS.to_string(), |a| a.join(",")),
            n: p.map_or(e.n.unwrap_or(defaults::N), |p| p.n),
            draws: p.map_or(e.draws.unwrap_or(defaults::DRAWS), |p| p.draws),
            check_points: p.map_or(e.check_points.unwrap_or(defaults::CHECK_POINTS), |p| {
                p.check_points
            }),
            seed: e.seed,
            batch_size: e.batch_size,
            steps: e.steps,
            eot: e.eot.unwrap_or(defaults::STUDY_EOT),
            plan,
        };
        if ev.n == 0 {
            bail!("[eval] n = 0: expected at least 1 point");
        }
        // Every budget's attacks parse and validate now, not after hours of training.
        for &(eps, _) in &ev.budgets {
            ev.config(eps, String::new(), String::new())?
                .validate()
                .context("[eval]")?;
        }
        Ok(ev)
    }

    /// The evaluation at `eps` of the model and data named by `model` and `data`.
    fn config(&self, eps: f64, model: String, data: String) -> Result<RobustConfig> {
        let (attacks, settings) = self.attacks_at(eps)?;
        Ok(RobustConfig {
            attacks,
            settings,
            draws: self.draws,
            batch_size: self.batch_size,
            seed: self.seed,
            check_points: self.check_points,
            model,
            data,
            plan: self.plan.as_ref().map(|p| p.description.clone()),
        })
    }

    fn attacks_at(
        &self,
        eps: f64,
    ) -> Result<(Vec<crate::eval::robust::AttackSpec>, AttackSettings)> {
        let mut settings = AttackSettings::new(Budget::new(Norm::Linf, eps)?);
        match &self.plan {
            Some(p) => p.attacks(settings, true),
            None => {
                settings.steps = self.steps;
                settings.eot = self.eot;
                let attacks =
                    parse_attacks(&self.attacks, &mut settings).context("[eval] attacks")?;
                Ok((attacks, settings))
            }
        }
    }
}

/// One row of the comparison: a defended model at a budget.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// "pre-trained" or "AToP".
    pub purifier: String,
    pub eps: String,
    pub clean: Scores,
    /// Per point, the worst case over the clean image and every attack.
    pub robust: Scores,
    pub results: PathBuf,
    pub minutes: f64,
    /// The attack that broke the most points (lowest single-draw accuracy).
    pub strongest: String,
    /// At least one attack differentiated the defended model (else: transfer accuracy).
    pub adaptive: bool,
}

/// What a stage took and gave.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: String,
    pub model: PathBuf,
    /// "trained", or "given" for a checkpoint used as it is.
    pub how: String,
    /// Training minutes: the sum of its epochs' times, per-epoch evaluations included (None
    /// for a given one).
    pub minutes: Option<f64>,
    /// The last epoch's headline numbers.
    pub note: String,
}

/// `summary.json`: what `atop run` prints with --json.
#[derive(Debug, Clone, Serialize)]
pub struct StudySummary {
    pub out: PathBuf,
    pub description: String,
    pub stages: Vec<StageReport>,
    pub protocol: String,
    /// R: draws of the model per scored image.
    pub draws: usize,
    pub rows: Vec<Row>,
    /// Per budget, AToP against the pre-trained purifier point by point.
    pub comparisons: Vec<Comparison>,
    pub report: PathBuf,
    pub provenance: String,
}

const STUDY: &str = "study.json";

/// Runs (or resumes) the study `plan` in `out`.
pub fn run(plan: &StudyPlan, out: &Path, device: tch::Device) -> Result<StudySummary> {
    open(plan, out)?;
    let (classifier, pretrained, tuned) = plan.models(out);
    let stages = vec![
        run_stage(
            "classifier",
            &plan.classifier,
            out,
            |c| c.epochs,
            |c, dir, resume| crate::train::classifier::train(c, dir, device, resume).map(drop),
            |_, r| format!("test accuracy {:.2} %", 100.0 * num(r, "test_acc")),
        )?,
        run_stage(
            "purifier",
            &plan.purifier,
            out,
            |c| c.epochs,
            |c, dir, resume| crate::train::purifier::train(c, dir, device, resume).map(drop),
            |_, r| {
                format!(
                    "PSNR {:.2} dB, classifier on purified images {:.2} %",
                    num(r, "psnr"),
                    100.0 * num(r, "purified_acc")
                )
            },
        )?,
        run_stage(
            "atop",
            &plan.atop,
            out,
            |c| c.epochs,
            |c, dir, resume| crate::train::atop::train(c, dir, device, resume).map(drop),
            |c, r| {
                format!(
                    "per-epoch check on {} images: defended clean {:.2} %, whole-model PGD {:.2} %",
                    c.eval.subset,
                    100.0 * num(r, "defended_clean_acc"),
                    100.0 * num(r, "robust_acc")
                )
            },
        )?,
    ];
    let mut rows = Vec::new();
    let mut evaluations = Vec::new();
    for (label, folder, purifier) in [
        ("pre-trained", "pretrained", &pretrained),
        ("AToP", "atop", &tuned),
    ] {
        for (eps, eps_name) in &plan.eval.budgets {
            let dir = out.join("eval").join(format!(
                "{folder}-eps{}",
                eps_name.trim_end_matches("/255").replace('.', "p")
            ));
            tracing::info!(
                "study: evaluating {label} at {eps_name} ({})",
                dir.display()
            );
            // Always through the evaluation: a finished one is read back when its settings,
            // weights and images match those now in place (a retrained stage is not reused).
            let results = evaluate(plan, &classifier, purifier, *eps, &dir, device)?;
            let e = results.evaluation;
            rows.push(Row {
                purifier: label.into(),
                eps: eps_name.clone(),
                clean: e.clean.clone(),
                robust: e.worst_case.clone(),
                results: dir.join("report.md"),
                minutes: e.seconds / 60.0,
                strongest: e
                    .strongest()
                    .map_or("-".into(), |(ai, _)| e.attacks[ai].attack.clone()),
                adaptive: e.adaptive(),
            });
            evaluations.push((label, eps_name.clone(), e));
        }
    }
    let mut comparisons = Vec::new();
    for (label, eps, pre) in &evaluations {
        if *label != "pre-trained" {
            continue;
        }
        if let Some((_, _, tuned)) = evaluations
            .iter()
            .find(|(l, e, _)| *l == "AToP" && e == eps)
        {
            comparisons.push(Comparison::of(
                eps,
                ("the pre-trained purifier", pre),
                ("AToP", tuned),
            )?);
        }
    }
    let engine = crate::runtime::engine_info();
    let summary = StudySummary {
        out: out.to_path_buf(),
        description: plan.description.clone(),
        stages,
        protocol: protocol(&plan.eval),
        draws: plan.eval.draws,
        rows,
        comparisons,
        report: out.join("report.md"),
        provenance: format!(
            "atop {}, torch {}, {device:?}, {} threads, {}; finished {}",
            engine.atop_version,
            engine.torch_version,
            engine.threads,
            engine.cpu,
            crate::io::utc_now()
        ),
    };
    crate::io::write_json(&out.join("summary.json"), &summary)?;
    let text = markdown(&summary);
    crate::io::write_atomic(&summary.report, |w| {
        std::io::Write::write_all(w, text.as_bytes()).context("cannot write report.md")
    })?;
    Ok(summary)
}

/// Creates the study folder, or checks that the one there holds this very study.
fn open(plan: &StudyPlan, out: &Path) -> Result<()> {
    let path = out.join(STUDY);
    let wanted = serde_json::to_value(plan)?;
    if path.exists() {
        let saved: serde_json::Value = crate::io::read_json(&path, "a study's settings")?;
        if saved != wanted {
            let stage = ["classifier", "purifier", "atop", "eval", "description"]
                .into_iter()
                .find(|k| saved.get(k) != wanted.get(k))
                .unwrap_or("settings");
            bail!(
                "{} holds a study with other settings ({stage} differs): rerun its own settings to resume it, or choose another --out",
                out.display()
            );
        }
        return Ok(());
    }
    if let Ok(mut entries) = std::fs::read_dir(out)
        && let Some(Ok(entry)) = entries.next()
    {
        bail!(
            "{} holds {} and no study: a study starts in an empty or new folder",
            out.display(),
            entry.file_name().to_string_lossy()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::io::write_json(&path, &wanted)
}

/// Whether the stage's run in `dir` still has epochs to train (it logs which).
fn announce(stage: &str, dir: &Path, epochs: usize) -> bool {
    match checkpoint::read_last(dir) {
        Ok(l) if l.epoch >= epochs => {
            tracing::info!("study: {stage}: finished earlier ({})", dir.display());
            false
        }
        Ok(l) => {
            tracing::info!(
                "study: {stage}: resuming after epoch {} of {epochs} ({})",
                l.epoch,
                dir.display()
            );
            true
        }
        Err(_) => {
            tracing::info!(
                "study: {stage}: training {epochs} epochs ({})",
                dir.display()
            );
            true
        }
    }
}

fn num(record: &serde_json::Value, key: &str) -> f64 {
    record.get(key).and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
}

/// Trains the stage into `out/name` (or finishes or keeps what is there), or checks the given
/// checkpoint; then what it took and gave. `note` words the last epoch's record.
fn run_stage<T>(
    name: &str,
    stage: &Stage<T>,
    out: &Path,
    epochs: impl Fn(&T) -> usize,
    train: impl FnOnce(&T, &Path, bool) -> Result<()>,
    note: impl Fn(&T, &serde_json::Value) -> String,
) -> Result<StageReport> {
    match stage {
        Stage::Train(cfg) => {
            let dir = out.join(name);
            if announce(name, &dir, epochs(cfg)) {
                train(cfg, &dir, dir.join(runlog::CONFIG).exists())?;
            }
            trained(name, &dir, |r| note(cfg, r))
        }
        Stage::Given(p) => given(name, p),
    }
}

fn trained(
    stage: &str,
    dir: &Path,
    note: impl Fn(&serde_json::Value) -> String,
) -> Result<StageReport> {
    let records: Vec<serde_json::Value> = runlog::read(dir)?;
    let seconds: f64 = records.iter().map(|r| num(r, "seconds")).sum();
    Ok(StageReport {
        stage: stage.into(),
        model: dir.to_path_buf(),
        how: "trained".into(),
        minutes: Some(seconds / 60.0),
        note: records.last().map(&note).unwrap_or_default(),
    })
}

/// A stage given as a checkpoint (checked to exist when the plan was resolved).
fn given(stage: &str, path: &Path) -> Result<StageReport> {
    Ok(StageReport {
        stage: stage.into(),
        model: path.to_path_buf(),
        how: "given".into(),
        minutes: None,
        note: String::new(),
    })
}

/// One `eval robust` of classifier(purifier(t(x))) at `eps` into `dir`.
fn evaluate(
    plan: &StudyPlan,
    classifier: &Path,
    purifier: &Path,
    eps: f64,
    dir: &Path,
    device: tch::Device,
) -> Result<crate::eval::run::RobustResults> {
    let e = &plan.eval;
    let target = TargetSpec {
        model: classifier.to_path_buf(),
        purifier: Some(purifier.to_path_buf()),
        data: ModelData::default(),
        n: Some(e.n),
        seed: e.seed,
        ..Default::default()
    }
    .load(device)?;
    let config = e.config(eps, target.describe()?, target.data.clone())?;
    let run = crate::eval::run::evaluate_into(&target, &config, None, dir, device)?;
    crate::report::robust::write_run(dir, &run, &target)?;
    Ok(run.results)
}

fn protocol(e: &EvalPlan) -> String {
    let budgets: Vec<&str> = e.budgets.iter().map(|(_, s)| s.as_str()).collect();
    let attacks = match &e.plan {
        Some(p) => format!("the plan {}", p.description),
        None => format!(
            "{} ({}, EOT {})",
            e.attacks,
            e.steps
                .map_or("each attack's default iterations".to_string(), |s| format!(
                    "{s} iterations"
                )),
            e.eot
        ),
    };
    format!(
        "Linf {} on {} seeded test images (seed {}); attacks: {attacks}, on the whole defended model with exact gradients through transform, purifier and classifier (transfer: computed on the classifier alone, scored on the whole model); every image scored by R = {} draws of the model; robust = right on the clean and on every attacked image; 95 % Clopper-Pearson intervals",
        budgets.join(" and "),
        e.n,
        e.seed,
        e.draws
    )
}

fn show(s: &Scores) -> [String; 3] {
    let p = |p: &crate::eval::stats::Proportion| {
        format!(
            "{:.2} % [{:.1}, {:.1}]",
            100.0 * p.value,
            100.0 * p.lo,
            100.0 * p.hi
        )
    };
    [p(&s.single), p(&s.majority), p(&s.worst_of_r)]
}

/// The study's `report.md`.
pub fn markdown(s: &StudySummary) -> String {
    use std::fmt::Write;
    let mut m = String::new();
    let _ = writeln!(m, "# atop run: {}\n", s.description);
    let _ = writeln!(m, "Folder `{}`; {}.\n", s.out.display(), s.provenance);
    let _ = writeln!(m, "## Stages\n");
    let _ = writeln!(m, "| stage | model | how | minutes | last epoch |");
    let _ = writeln!(m, "|---|---|---|---|---|");
    for st in &s.stages {
        let _ = writeln!(
            m,
            "| {} | `{}` | {} | {} | {} |",
            st.stage,
            st.model.display(),
            st.how,
            st.minutes.map_or("-".into(), |x| format!("{x:.1}")),
            st.note
        );
    }
    let _ = writeln!(
        m,
        "\n## Robustness: pre-trained against AToP-fine-tuned purifier\n"
    );
    let _ = writeln!(m, "Protocol: {}.\n", s.protocol);
    let draws = s.draws;
    let adaptive = s.rows.iter().all(|r| r.adaptive);
    let what = if adaptive {
        "robust"
    } else {
        "transfer accuracy (no attack differentiated the defended model: not robust accuracy)"
    };
    let _ = writeln!(
        m,
        "| purifier | eps | clean, single draw | {what}, single draw | {what}, majority of {draws} | {what}, worst of {draws} | strongest attack | minutes |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|");
    for row in &s.rows {
        let [single, majority, worst] = show(&row.robust);
        let _ = writeln!(
            m,
            "| {} | {} | {} | {single} | {majority} | {worst} | {} | {:.1} |",
            row.purifier,
            row.eps,
            show(&row.clean)[0],
            row.strongest,
            row.minutes
        );
    }
    let _ = writeln!(
        m,
        "\nThe intervals in the table are each model's own (95 % Clopper-Pearson over the points). The two models are scored on the same points and the same draws, so the comparison below is paired: per point the share of draws right under AToP minus under the pre-trained purifier, averaged, with a 95 % interval from {} bootstrap resamples of the points.\n",
        crate::eval::stats::BOOTSTRAP_RESAMPLES
    );
    let _ = writeln!(
        m,
        "| eps | robust, single draw: AToP - pre-trained | points better / worse | clean, single draw: AToP - pre-trained | points better / worse | robust majority: only AToP / only pre-trained (McNemar p) |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|");
    for c in &s.comparisons {
        let _ = writeln!(
            m,
            "| {} | {} | {} / {} | {} | {} / {} | {} / {} ({:.3}) |",
            c.eps,
            c.robust.show(),
            c.robust.better,
            c.robust.worse,
            c.clean.show(),
            c.clean.better,
            c.clean.worse,
            c.robust_majority.b,
            c.robust_majority.c,
            c.robust_majority.p
        );
    }
    let _ = writeln!(m);
    for c in &s.comparisons {
        let _ = writeln!(m, "- {}", c.sentence());
    }
    let _ = writeln!(
        m,
        "\nEach evaluation's own report (every attack, the sanity checks, per-point records):"
    );
    for row in &s.rows {
        let _ = writeln!(
            m,
            "- {} at {}: `{}`",
            row.purifier,
            row.eps,
            row.results.display()
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_study_preset_resolves() {
        for (name, _) in PRESETS {
            let cfg = StudyConfig::preset(name).unwrap();
            let plan = StudyPlan::new(&cfg, Path::new("runs/x")).unwrap();
            let Stage::Train(atop) = &plan.atop else {
                panic!("{name}: the AToP stage is not trained")
            };
            assert_eq!(
                atop.classifier.as_deref(),
                Some(Path::new("runs/x/classifier"))
            );
            assert_eq!(atop.purifier.as_deref(), Some(Path::new("runs/x/purifier")));
        }
    }

    #[test]
    fn stage_settings_merge_over_the_preset_key_by_key() {
        let cfg = StudyConfig::from_toml(
            r#"
            description = "t"
            [classifier]
            checkpoint = "src"
            [purifier]
            checkpoint = "presets"
            [atop]
            preset = "atop-cifar10-cpu"
            [atop.set]
            epochs = 2
            adversary = { steps = 1 }
            [eval]
            eps = ["8/255", "0.01"]
            steps = 3
            n = 4
            draws = 2
            "#,
            "test",
        )
        .unwrap();
        let plan = StudyPlan::new(&cfg, Path::new("o")).unwrap();
        let Stage::Train(a) = &plan.atop else {
            panic!()
        };
        let preset = TrainAtopConfig::preset("atop-cifar10-cpu").unwrap();
        assert_eq!(a.epochs, 2);
        assert_eq!(a.adversary.steps, 1);
        // The rest of the adversary table is the preset's.
        assert_eq!(a.adversary.eps, preset.adversary.eps);
        assert_eq!(a.adversary.attack, preset.adversary.attack);
        assert_eq!(a.lambda, preset.lambda);
        assert_eq!(a.classifier.as_deref(), Some(Path::new("src")));
        assert_eq!(a.purifier.as_deref(), Some(Path::new("presets")));
        let labels: Vec<&str> = plan.eval.budgets.iter().map(|b| b.1.as_str()).collect();
        assert_eq!(labels, ["8/255", "0.01"]);
    }

    #[test]
    fn bad_studies_are_refused_naming_the_field() {
        let base = |atop: &str, eval: &str| {
            format!(
                "description = \"t\"\n[classifier]\ncheckpoint = \"src\"\n[purifier]\ncheckpoint = \"presets\"\n[atop]\n{atop}\n[eval]\n{eval}\n"
            )
        };
        let err = |text: String| match StudyConfig::from_toml(&text, "t")
            .and_then(|c| StudyPlan::new(&c, Path::new("o")))
        {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => format!("{e:#}"),
        };
        let ok_eval = "eps = [\"8/255\"]";
        for (atop, eval, expect) in [
            (
                "preset = \"atop-demo\"\n[atop.set]\nlambda = -1",
                ok_eval,
                "lambda",
            ),
            (
                "preset = \"atop-demo\"\n[atop.set]\npurifier = \"x\"",
                ok_eval,
                "the study sets it",
            ),
            ("preset = \"nope\"", ok_eval, "expected one of"),
            (
                "preset = \"atop-demo\"\ncheckpoint = \"x\"",
                ok_eval,
                "not both",
            ),
            (
                "preset = \"atop-demo\"\n[atop.set]\nepochz = 1",
                ok_eval,
                "epochz",
            ),
            ("preset = \"atop-demo\"", "eps = []", "at least one"),
            ("preset = \"atop-demo\"", "eps = [\"9/0\"]", "eps"),
            (
                "preset = \"atop-demo\"",
                "eps = [\"8/255\"]\nattacks = [\"pgdd\"]",
                "pgdd",
            ),
            (
                "preset = \"atop-demo\"",
                "eps = [\"8/255\"]\nplan = \"eval-robust-cpu\"\nn = 3",
                "the plan",
            ),
            (
                "preset = \"atop-demo\"",
                "eps = [\"8/255\"]\ndraws = 0",
                "draws",
            ),
        ] {
            let e = err(base(atop, eval));
            assert!(e.contains(expect), "{atop} / {eval}: {e}");
        }
    }
}
