//! What a study runs: its TOML settings (presets, per-stage sources and overrides), resolved
//! into a plan of stages and one evaluation plan shared by every defended model.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::attacks::{AttackSettings, Budget, Norm, parse_eps};
use crate::eval::compare::eps_label;
use crate::eval::defaults;
use crate::eval::plan::Plan;
use crate::eval::robust::{RobustConfig, parse_attacks};
use crate::train::atop::TrainAtopConfig;
use crate::train::classifier::TrainClassifierConfig;
use crate::train::purifier::TrainPurifierConfig;

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
    ("cpu-ae", include_str!("../../presets/run-cpu-ae.toml")),
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

/// A purifier given as a stage, checked against what its description records: the purifier
/// stage takes a pre-trained purifier, the atop stage one fine-tuned by AToP.
pub(super) fn given_purifier(stage: &str, c: &Path, fine_tuned: bool) -> Result<()> {
    let dir = crate::purifier::resolve(c).with_context(|| format!("[{stage}] checkpoint"))?;
    let sidecar = crate::purifier::read_sidecar(&dir)?;
    match (sidecar.fine_tuning.is_some(), fine_tuned) {
        (true, false) => bail!(
            "[{stage}] checkpoint = \"{}\" is fine-tuned by AToP (its description records the fine-tuning): give the pre-trained purifier here, and this one as [atop] checkpoint",
            c.display()
        ),
        (false, true) => bail!(
            "[{stage}] checkpoint = \"{}\" is not fine-tuned by AToP (its description records no fine-tuning): give an AToP checkpoint here, and a pre-trained purifier as [purifier] checkpoint",
            c.display()
        ),
        _ => Ok(()),
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

    /// Checks the stages given as checkpoints against what their descriptions record (the
    /// purifier stage pre-trained, the atop stage fine-tuned by AToP): before any work.
    pub(super) fn check_given(&self) -> Result<()> {
        if let Stage::Given(c) = &self.purifier {
            given_purifier("purifier", c, false)?;
        }
        if let Stage::Given(c) = &self.atop {
            given_purifier("atop", c, true)?;
        }
        Ok(())
    }

    /// The classifier, the pre-trained and the fine-tuned purifier this study evaluates.
    pub(super) fn models(&self, out: &Path) -> (PathBuf, PathBuf, PathBuf) {
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
            let label = eps_label(eps);
            if let Some((_, same)) = budgets.iter().find(|(_, l)| *l == label) {
                bail!("[eval] eps \"{s}\" is the budget {same} again: give each budget once");
            }
            budgets.push((eps, label));
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
    pub(super) fn config(&self, eps: f64, model: String, data: String) -> Result<RobustConfig> {
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
            cascade: false,
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
