//! Robust accuracy of any [`Model`], stochastic ones included, scored so that it survives
//! scrutiny: every attack runs on every point (not only on the points one clean draw got
//! right), and every clean or adversarial image is then classified by R independent draws of
//! the model. From those draws come three scores, each with a 95 % Clopper-Pearson interval:
//! single draw (mean and std over the R draws), majority vote, and worst of R (a point counts
//! only if all R draws are right). The worst case per point is taken over all attacks, with
//! the clean image counted as one of them. Sanity checks measure instead of trusting
//! declarations (randomness, gradients, attack orderings). Progress is saved after every
//! batch: an interrupted evaluation resumes without redoing finished work.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::stats::Proportion;
use crate::attacks::runner::{BatchResult, attack_batch, check_budget};
use crate::attacks::{AttackName, AttackSettings, GradStats};
use crate::models::{Measured, Model};

/// Which model an attack differentiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The whole evaluated model (adaptive, exact gradients, EOT from the settings).
    Whole,
    /// The undefended classifier; the images are then scored on the whole model: a transfer
    /// attack, never a robustness claim on its own.
    Transfer,
    /// The whole model with the defence stages differentiated as the identity (BPDA), with EOT
    /// from the settings; scored on the whole model.
    Bpda,
}

/// The models attacks may differentiate instead of the evaluated one.
#[derive(Clone, Copy, Default)]
pub struct Surrogates<'a> {
    /// The classifier alone (transfer attacks).
    pub classifier: Option<&'a dyn Model>,
    /// The model with an identity backward through its defence (BPDA attacks).
    pub bpda: Option<&'a dyn Model>,
}

/// A deterministic slice of an evaluation: the batches b (in order of the seeded points) with
/// b mod count == index. Every batch is attacked and drawn exactly as in the whole run, so merged
/// shards give the whole run's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("shard '{s}': expected i/n with 0 <= i < n (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    fn owns(self, batch: usize) -> bool {
        batch % self.count == self.index
    }
}

/// One attack of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackSpec {
    pub attack: AttackName,
    pub target: Target,
}

impl AttackSpec {
    pub fn label(&self) -> String {
        match self.target {
            Target::Whole => self.attack.to_string(),
            Target::Transfer => format!("transfer-{}", self.attack),
            Target::Bpda => format!("bpda-{}", self.attack),
        }
    }

    /// Black-box (queries only).
    fn black_box(&self) -> bool {
        self.attack == AttackName::Square
    }
}

/// Parses `pgd,apgd-ce,transfer,bpda,...`: attack names, AutoAttack compositions, `transfer`
/// (PGD on the classifier alone) and `bpda` (PGD with the identity backward through the
/// defence). Compositions may raise the settings' EOT (`autoattack-rand`).
pub fn parse_attacks(list: &str, settings: &mut AttackSettings) -> Result<Vec<AttackSpec>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let special = match part.to_ascii_lowercase().as_str() {
            "transfer" => Some(Target::Transfer),
            "bpda" => Some(Target::Bpda),
            _ => None,
        };
        if let Some(target) = special {
            out.push(AttackSpec {
                attack: AttackName::Pgd,
                target,
            });
            continue;
        }
        for attack in crate::attacks::runner::expand(part, settings)? {
            out.push(AttackSpec {
                attack,
                target: Target::Whole,
            });
        }
    }
    if out.is_empty() {
        bail!("--attack: no attack given");
    }
    let mut seen = std::collections::HashSet::new();
    for a in &out {
        if !seen.insert(a.label()) {
            bail!("--attack: {} is listed twice", a.label());
        }
    }
    Ok(out)
}

/// R beyond this buys nothing measurable at n <= 10,000 and only costs time and memory.
pub const MAX_DRAWS: usize = 1000;

/// Everything that defines an evaluation (a resumed one must match it exactly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RobustConfig {
    pub attacks: Vec<AttackSpec>,
    pub settings: AttackSettings,
    /// R: independent draws of the model per scored image.
    pub draws: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Points (the first of the evaluated ones) for the checks that need their own PGD runs:
    /// an eps grid and unbounded eps, doubled iterations, doubled EOT, one fixed draw. 0: none.
    #[serde(default)]
    pub check_points: usize,
    /// Identifies the model (its files' content hash where known) and the data.
    pub model: String,
    pub data: String,
    /// The plan (`--preset` / `--config`) the attacks and budgets came from, in words.
    #[serde(default)]
    pub plan: Option<String>,
}

impl RobustConfig {
    pub fn validate(&self) -> Result<()> {
        self.settings.validate()?;
        if !(1..=MAX_DRAWS).contains(&self.draws) {
            bail!(
                "draws = {}: expected 1 <= R <= {MAX_DRAWS} draws of the model per image",
                self.draws
            );
        }
        if self.batch_size == 0 {
            bail!("batch_size = 0: expected at least 1");
        }
        if self.attacks.is_empty() {
            bail!("no attack given");
        }
        for a in &self.attacks {
            self.settings.for_attack(a.attack).build(a.attack)?;
        }
        Ok(())
    }
}

/// The three scores of a set of points, each with its interval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scores {
    /// Single draw: mean over the R draws of the accuracy of one draw, its std over draws, and
    /// the interval of the mean as a proportion of n (the draws are not independent trials).
    pub single: Proportion,
    pub single_std: f64,
    /// Majority (plurality) vote of the R predictions.
    pub majority: Proportion,
    /// All R draws right.
    pub worst_of_r: Proportion,
}

impl Scores {
    /// From per-point, per-draw correctness (`correct[i][r]`) and plurality correctness.
    fn from(correct: &[Vec<bool>], majority: &[bool]) -> Scores {
        let n = correct.len();
        let r = correct.first().map_or(0, Vec::len);
        let per_draw: Vec<f64> = (0..r)
            .map(|d| correct.iter().filter(|c| c[d]).count() as f64 / n.max(1) as f64)
            .collect();
        let mean = per_draw.iter().sum::<f64>() / r.max(1) as f64;
        let var = per_draw.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (r.max(2) - 1) as f64;
        let mut single = Proportion::new((mean * n as f64).round() as usize, n);
        single.value = mean;
        Scores {
            single,
            single_std: var.sqrt(),
            majority: Proportion::new(majority.iter().filter(|&&m| m).count(), n),
            worst_of_r: Proportion::new(correct.iter().filter(|c| c.iter().all(|&b| b)).count(), n),
        }
    }
}

/// What R draws of the model said about one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Draws {
    /// The R predicted labels.
    pub preds: Vec<i64>,
}

impl Draws {
    fn correct(&self, label: i64) -> Vec<bool> {
        self.preds.iter().map(|&p| p == label).collect()
    }

    /// The most frequent label (the smallest of tied ones), for records.
    pub fn plurality(&self) -> i64 {
        let mut counts: std::collections::BTreeMap<i64, usize> = Default::default();
        for &p in &self.preds {
            *counts.entry(p).or_default() += 1;
        }
        let best = counts.values().copied().max().unwrap_or(0);
        counts
            .into_iter()
            .find(|&(_, c)| c == best)
            .map_or(-1, |(l, _)| l)
    }

    /// Majority-vote correctness; a tie with another label counts as wrong.
    fn majority_correct(&self, label: i64) -> bool {
        let mine = self.preds.iter().filter(|&&p| p == label).count();
        let mut counts: std::collections::HashMap<i64, usize> = Default::default();
        for &p in self.preds.iter().filter(|&&p| p != label) {
            *counts.entry(p).or_default() += 1;
        }
        mine > 0 && counts.values().all(|&c| c < mine)
    }
}

/// One attack's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttackResult {
    pub attack: String,
    pub target: Target,
    pub scores: Scores,
    pub seconds: f64,
    pub grad: GradStats,
    /// Its budget in words (iterations, EOT draws, targets, restarts, queries).
    #[serde(default)]
    pub budget: String,
    /// EOT draws per step it ran with (1 on the classifier alone and on a model measured
    /// deterministic, where more draws are the same draw).
    #[serde(default = "one")]
    pub eot: usize,
    /// Input gradients per point its budget allows, each an EOT draw (forward+backward
    /// counted once): the declared ceiling, the same for every point (restarts and targets
    /// after the first run only on the points not yet broken).
    pub gradient_evaluations_per_point: Option<usize>,
    /// Forward-only queries per point (Square), the declared ceiling.
    #[serde(default)]
    pub queries_per_point: Option<usize>,
}

fn one() -> usize {
    1
}

/// One sanity check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    pub name: String,
    /// PASS, WARN or INFO.
    pub status: String,
    pub detail: String,
}

impl Check {
    fn new(name: &str, pass: bool, detail: String) -> Check {
        Check {
            name: name.into(),
            status: if pass { "PASS" } else { "WARN" }.into(),
            detail,
        }
    }
}

/// Per point: its draws on the clean image and on each attack's image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PointRecord {
    /// Position among the evaluated points, and index in the dataset split.
    pub position: usize,
    pub index: usize,
    pub label: i64,
    pub clean: Draws,
    /// In the order of the config's attacks.
    pub attacks: Vec<Draws>,
    /// Linf/L2/L1 norm (the budget's) of each attack's perturbation.
    pub perturbation_norms: Vec<f64>,
    /// Per attack, the share of draws it claimed its image fools at attack time (see
    /// [`crate::attacks::AttackOutput::claimed`]); None (or absent) where not recorded, as in
    /// results written before 2026-12-06.
    #[serde(default)]
    pub claimed: Vec<Option<f64>>,
}

/// The finished evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RobustEvaluation {
    pub config: RobustConfig,
    /// Set for one shard of an evaluation (its records and scores cover its points only).
    pub shard: Option<Shard>,
    /// Points scored here.
    pub n: usize,
    /// All evaluated points' dataset indices (every shard's).
    pub indices: Vec<usize>,
    /// What the model declares (compared with the measurement) and its number of classes.
    pub declared_stochastic: bool,
    pub classes: usize,
    /// Two calls on the same images differed (measured, not declared).
    pub stochastic: bool,
    /// The largest |logit difference| between two calls on the same clean images.
    pub max_logit_change: f64,
    pub clean: Scores,
    pub attacks: Vec<AttackResult>,
    /// Per point, the worst case over the clean image and every attack (transfer included).
    pub worst_case: Scores,
    pub checks: Vec<Check>,
    /// The check runs' curves: single-draw accuracy under PGD on the check points.
    pub curves: CheckCurves,
    pub records: Vec<PointRecord>,
    pub seconds: f64,
}

impl RobustEvaluation {
    /// At least one attack differentiated the evaluated model (whole-model or BPDA): without
    /// one, the scores are transfer accuracy, not robust accuracy.
    pub fn adaptive(&self) -> bool {
        self.attacks.iter().any(|a| a.target != Target::Transfer)
    }

    /// The attack that broke the most points on an average draw (lowest single-draw accuracy),
    /// and how many points it alone broke by majority vote; None without attacks.
    pub fn strongest(&self) -> Option<(usize, usize)> {
        let (ai, _) = self
            .attacks
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.scores.single.value.total_cmp(&b.1.scores.single.value))?;
        let alone = self
            .records
            .iter()
            .filter(|r| {
                let broken = |d: &Draws| !d.majority_correct(r.label);
                broken(&r.attacks[ai])
                    && r.majority_clean_right()
                    && r.attacks
                        .iter()
                        .enumerate()
                        .all(|(j, d)| j == ai || !broken(d))
            })
            .count();
        Some((ai, alone))
    }
}

impl PointRecord {
    fn majority_clean_right(&self) -> bool {
        self.clean.majority_correct(self.label)
    }

    /// This point's scores: clean, and the worst case over the clean image and every attack
    /// (per draw index, as [`RobustEvaluation::worst_case`] counts them).
    pub fn scores(&self) -> PointScores {
        let r = self.clean.preds.len().max(1);
        let clean = self.clean.correct(self.label);
        let mut worst = clean.clone();
        for a in &self.attacks {
            for (w, c) in worst.iter_mut().zip(a.correct(self.label)) {
                *w &= c;
            }
        }
        let share = |v: &[bool]| v.iter().filter(|&&b| b).count() as f64 / r as f64;
        PointScores {
            clean_single: share(&clean),
            clean_majority: self.majority_clean_right(),
            robust_single: share(&worst),
            robust_majority: self.majority_clean_right()
                && self.attacks.iter().all(|a| a.majority_correct(self.label)),
        }
    }
}

/// One point's scores, for paired comparisons of two evaluations on the same points.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointScores {
    /// Share of the R draws right on the clean image.
    pub clean_single: f64,
    pub clean_majority: bool,
    /// Share of the R draws right on the clean image and on every attack's image.
    pub robust_single: f64,
    pub robust_majority: bool,
}

/// Single-draw accuracy under whole-model PGD on the check points, as the budget varies.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckCurves {
    pub points: usize,
    /// (eps, accuracy); the last entry is the unbounded budget.
    pub eps: Vec<(f64, f64)>,
    /// (iterations, accuracy).
    pub iterations: Vec<(f64, f64)>,
    /// (EOT samples, accuracy).
    pub eot: Vec<(f64, f64)>,
    /// Accuracy when the model's randomness is fixed to one draw (attacked and scored on it).
    pub fixed_draw: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    config: RobustConfig,
    #[serde(default)]
    shard: Option<Shard>,
    indices: Vec<usize>,
    stochastic: bool,
    max_logit_change: f64,
    clean: Vec<Option<Draws>>,
    /// [attack][point]
    done: Vec<Vec<Option<Draws>>>,
    norms: Vec<Vec<f64>>,
    /// [attack][point]: what the attack claimed of its image at attack time (None where not
    /// recorded: states written before 2026-12-06).
    #[serde(default)]
    claimed: Vec<Vec<Option<f64>>>,
    grad: Vec<GradStats>,
    seconds: Vec<f64>,
    /// Batch files (attack, first point), in order.
    batches: Vec<String>,
    /// Finished check runs: name -> single-draw accuracy.
    #[serde(default)]
    check_runs: std::collections::BTreeMap<String, f64>,
}

const STATE: &str = "state.json";
const BATCHES: &str = "batches";

/// Refuses an output folder that holds anything but an evaluation's own files (state, batches,
/// results, report, plots), or finished results without the state to resume them (a merged
/// report): an evaluation writes only into a new or empty folder or resumes its own.
pub fn check_output_dir(out: &Path) -> Result<()> {
    crate::io::check_output_dir(
        out,
        &[
            STATE,
            "batches/",
            "results.json",
            "records.csv",
            "report.md",
            "grid.png",
            "checks.png",
        ],
        "--out",
    )?;
    let occupied = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied && !out.join(STATE).exists() {
        bail!(
            "{} is not empty and holds no robust evaluation to resume: choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// The evaluated points: images N x C x H x W in [0,1], labels, dataset indices.
#[derive(Clone, Copy)]
pub struct Points<'a> {
    pub x: &'a Tensor,
    pub y: &'a Tensor,
    pub indices: &'a [usize],
}

/// Evaluates `model` on the `points`; transfer and BPDA attacks differentiate the `surrogates`. With `state_dir`, progress is saved after every batch and
/// an earlier run with the same config is resumed. Returns the evaluation and the adversarial
/// images of every attack (in config order).
pub fn evaluate(
    model: &dyn Model,
    surrogates: Surrogates<'_>,
    points: Points<'_>,
    config: &RobustConfig,
    shard: Option<Shard>,
    state_dir: Option<&Path>,
) -> Result<(RobustEvaluation, Vec<Tensor>)> {
    config.validate()?;
    let Points { x, y, indices } = points;
    let n = x.size()[0] as usize;
    if indices.len() != n || y.size() != [n as i64] {
        bail!(
            "{n} images, {} labels and {} indices",
            y.numel(),
            indices.len()
        );
    }
    if n == 0 {
        bail!("no images to evaluate");
    }
    let k = model.num_classes() as i64;
    let (lo, hi) = (y.min().int64_value(&[]), y.max().int64_value(&[]));
    if lo < 0 || hi >= k {
        bail!(
            "labels range over [{lo}, {hi}] but the model has {k} classes (expected 0..{})",
            k - 1
        );
    }
    for a in &config.attacks {
        match a.target {
            Target::Transfer if surrogates.classifier.is_none() => {
                bail!("a transfer attack needs the undefended classifier")
            }
            Target::Bpda if surrogates.bpda.is_none() => {
                bail!("a BPDA attack needs a defence stage to differentiate as the identity")
            }
            _ => {}
        }
    }
    let started = Instant::now();
    let device = model.device();
    let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu))?;
    let mut state = match load_state(state_dir, config, shard, indices)? {
        Some(s) => s,
        None => {
            let (stochastic, change) =
                measure_randomness(model, x, config.batch_size, config.seed)?;
            State {
                config: config.clone(),
                shard,
                indices: indices.to_vec(),
                stochastic,
                max_logit_change: change,
                clean: vec![None; n],
                done: vec![vec![None; n]; config.attacks.len()],
                norms: vec![vec![0.0; n]; config.attacks.len()],
                claimed: vec![vec![None; n]; config.attacks.len()],
                grad: vec![GradStats::default(); config.attacks.len()],
                seconds: vec![0.0; config.attacks.len()],
                batches: Vec::new(),
                check_runs: Default::default(),
            }
        }
    };
    if state.stochastic && min_white_box_eot(config, true) == Some(1) {
        tracing::warn!(
            "the model is random (two calls differ by up to {:.3e} in a logit) and EOT is 1: each attack step sees one draw",
            state.max_logit_change
        );
    }
    let batches: Vec<(usize, usize)> = (0..n)
        .step_by(config.batch_size)
        .enumerate()
        .filter(|(b, _)| shard.is_none_or(|sh| sh.owns(*b)))
        .map(|(_, s)| (s, (n - s).min(config.batch_size)))
        .collect();
    if batches.is_empty() {
        bail!(
            "shard {} holds no batch: {n} points in batches of {} make only {} batches",
            shard.map_or(String::new(), |s| s.to_string()),
            config.batch_size,
            n.div_ceil(config.batch_size)
        );
    }
    let slice = |t: &Tensor, s: usize, len: usize| t.narrow(0, s as i64, len as i64);
    // The clean draws.
    for &(s, len) in &batches {
        if state.clean[s].is_some() {
            continue;
        }
        let xb = slice(x, s, len).to_device(device).to_kind(Kind::Float);
        let draws = draw(model, &xb, config.draws, config.seed, usize::MAX, s)?;
        for (j, d) in draws.into_iter().enumerate() {
            state.clean[s + j] = Some(d);
        }
        save_state(state_dir, &state)?;
    }
    // Adversarial images: start from clean, replay finished batches.
    let x_adv: Vec<Tensor> = config
        .attacks
        .iter()
        .map(|_| x.to_device(Device::Cpu).to_kind(Kind::Float).copy())
        .collect();
    for b in &state.batches {
        // Checked against the run (attack, points, shape): a tampered file must not crash it.
        let (ai, s, images) = read_batch(state_dir, b, config, x)?;
        let len = images.size()[0] as usize;
        let xb = slice(x, s, len).to_device(Device::Cpu).to_kind(Kind::Float);
        // Resumed images are re-checked: a tampered or truncated file must not enter a report.
        check_budget(
            &images,
            &xb,
            &config.settings.budget,
            &format!("{} (resumed from {b})", config.attacks[ai].label()),
        )
        .with_context(|| {
            format!(
                "{}: the resume state is corrupt; delete {} to start over",
                batch_file(state_dir, b).display(),
                state_dir.map_or(Path::new("."), |d| d).display()
            )
        })?;
        x_adv[ai].narrow(0, s as i64, len as i64).copy_(&images);
    }
    for (ai, spec) in config.attacks.iter().enumerate() {
        let settings = attack_settings(config, spec, state.stochastic);
        // Each attack follows the rule for random models where its model is measured random:
        // the whole model and its BPDA twin (the same forward pass) as measured above, the
        // classifier alone by its own measurement.
        let attacked = match spec.target {
            Target::Whole => Measured {
                inner: model,
                stochastic: state.stochastic,
            },
            Target::Bpda => Measured {
                inner: surrogates.bpda.expect("checked above"),
                stochastic: state.stochastic,
            },
            Target::Transfer => {
                let f = surrogates.classifier.expect("checked above");
                Measured {
                    inner: f,
                    stochastic: measure_randomness(f, x, config.batch_size, config.seed)?.0,
                }
            }
        };
        let attack = settings.build(spec.attack)?;
        let todo: Vec<&(usize, usize)> = batches
            .iter()
            .filter(|(s, _)| state.done[ai][*s].is_none())
            .collect();
        if todo.is_empty() {
            continue;
        }
        let bar = crate::progress::bar(
            todo.iter().map(|(_, l)| *l as u64).sum(),
            &format!("{} ({}/{})", spec.label(), ai + 1, config.attacks.len()),
        );
        for &&(s, len) in &todo {
            let t = Instant::now();
            let xb = slice(x, s, len).to_device(device).to_kind(Kind::Float);
            let yb = slice(y, s, len).to_device(device);
            let seed = config.seed ^ ((ai as u64 + 1) << 40) ^ (s as u64).wrapping_mul(0x9E37_79B9);
            // Attacks that draw nothing themselves (FGSM) still meet a random model: fix its
            // draws too, so a resumed run attacks exactly as an uninterrupted one.
            tch::manual_seed(seed as i64);
            let BatchResult {
                adv,
                norms,
                claimed,
                grad,
            } = attack_batch(attack.as_ref(), &attacked, (&xb, &yb), seed, &spec.label())?;
            let draws = draw(model, &adv, config.draws, config.seed, ai, s)?;
            let adv_cpu = adv.to_device(Device::Cpu);
            let file = format!("{ai:02}-{:06}.safetensors", s);
            if let Some(dir) = state_dir {
                crate::io::write_safetensors(
                    &dir.join(BATCHES).join(&file),
                    &[("images".into(), adv_cpu.shallow_clone())],
                )?;
            }
            x_adv[ai].narrow(0, s as i64, len as i64).copy_(&adv_cpu);
            for (j, d) in draws.into_iter().enumerate() {
                state.done[ai][s + j] = Some(d);
                state.norms[ai][s + j] = norms[j];
                state.claimed[ai][s + j] = Some(claimed[j]);
            }
            state.grad[ai].add(grad);
            state.seconds[ai] += t.elapsed().as_secs_f64();
            state.batches.push(file);
            save_state(state_dir, &state)?;
            bar.inc(len as u64);
        }
        bar.finish_and_clear();
    }
    // The check runs belong to the first shard (on the first points of the whole set).
    let curves = if shard.is_none_or(|s| s.index == 0) {
        check_runs(model, x, y, config, &mut state, state_dir)?
    } else {
        CheckCurves::default()
    };
    let owned: Vec<usize> = batches.iter().flat_map(|&(s, len)| s..s + len).collect();
    let evaluation = finish(
        &state,
        &labels,
        &owned,
        model,
        curves,
        started.elapsed().as_secs_f64(),
    )?;
    Ok((evaluation, x_adv))
}

/// R seeded draws of `model` on a batch: the predictions per image. The seed depends on the
/// evaluation seed, the image set (`slot`: clean or an attack) and the batch, so a resumed run
/// draws the same.
fn draw(
    model: &dyn Model,
    x: &Tensor,
    r: usize,
    seed: u64,
    slot: usize,
    start: usize,
) -> Result<Vec<Draws>> {
    let n = x.size()[0] as usize;
    let mut preds = vec![Vec::new(); n];
    for d in 0..r {
        let s = seed
            .wrapping_mul(0x2545_F491_4F6C_DD1D)
            .wrapping_add((slot as u64).wrapping_mul(1_000_003))
            .wrapping_add((start as u64) << 20)
            .wrapping_add(d as u64);
        tch::manual_seed(s as i64);
        let logits = tch::no_grad(|| model.logits(x));
        let p = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))?;
        for (i, v) in p.into_iter().enumerate() {
            preds[i].push(v);
        }
    }
    Ok(preds.into_iter().map(|preds| Draws { preds }).collect())
}

/// Two calls on the same clean images (up to one batch): whether they differ, and by how much.
fn measure_randomness(
    model: &dyn Model,
    x: &Tensor,
    batch: usize,
    seed: u64,
) -> Result<(bool, f64)> {
    let len = (x.size()[0] as usize).min(batch) as i64;
    crate::attacks::select::measure_randomness(model, &x.narrow(0, 0, len), seed)
}

/// The model with its randomness fixed: every call draws the same transform (reseeded).
struct FixedDraw<'a> {
    inner: &'a dyn Model,
    seed: i64,
}

impl Model for FixedDraw<'_> {
    fn logits(&self, images: &Tensor) -> Tensor {
        tch::manual_seed(self.seed);
        self.inner.logits(images)
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn describe(&self) -> String {
        format!("{} (one fixed draw)", self.inner.describe())
    }
}

/// Single-draw accuracy (mean over `draws` draws) of `model` on PGD images made with
/// `settings` against `attacked`, on `x`.
fn pgd_accuracy(
    attacked: &dyn Model,
    scored: &dyn Model,
    x: &Tensor,
    y: &Tensor,
    settings: &AttackSettings,
    config: &RobustConfig,
    draws: usize,
) -> Result<f64> {
    let attack = settings.build(AttackName::Pgd)?;
    let attacked = Measured {
        inner: attacked,
        stochastic: measure_randomness(attacked, x, config.batch_size, config.seed)?.0,
    };
    let device = scored.device();
    let n = x.size()[0];
    let (mut hits, mut total) = (0usize, 0usize);
    for s in (0..n).step_by(config.batch_size) {
        let len = (n - s).min(config.batch_size as i64);
        let xb = x.narrow(0, s, len).to_device(device).to_kind(Kind::Float);
        let yb = y.narrow(0, s, len).to_device(device);
        let seed = config.seed ^ (0xC4EC_u64 << 32) ^ s as u64;
        tch::manual_seed(seed as i64);
        let adv = attack.run(&attacked, &xb, &yb, seed)?.x_adv.detach();
        let labels = Vec::<i64>::try_from(yb.to_device(Device::Cpu))?;
        let preds = draw(scored, &adv, draws, config.seed, usize::MAX - 1, s as usize)?;
        for (p, &l) in preds.iter().zip(&labels) {
            hits += p.preds.iter().filter(|&&q| q == l).count();
            total += p.preds.len();
        }
    }
    Ok(hits as f64 / total.max(1) as f64)
}

/// The checks that need their own PGD runs, on the first `check_points` points; each finished
/// run is saved in the state, so a resumed evaluation skips it.
fn check_runs(
    model: &dyn Model,
    x: &Tensor,
    y: &Tensor,
    config: &RobustConfig,
    state: &mut State,
    state_dir: Option<&Path>,
) -> Result<CheckCurves> {
    let m = config.check_points.min(x.size()[0] as usize);
    if m == 0 {
        return Ok(CheckCurves::default());
    }
    let (x, y) = (x.narrow(0, 0, m as i64), y.narrow(0, 0, m as i64));
    let base = config.settings.for_attack(AttackName::Pgd);
    let eps = base.budget.eps;
    let steps = base.steps.unwrap_or(20);
    let eot = base.eot;
    let draws = config.draws;
    let mut runs: Vec<(String, AttackSettings, bool)> = Vec::new();
    for f in [0.25, 0.5, 1.0, 2.0] {
        let mut s = base.clone();
        s.budget.eps = eps * f;
        s.step_size = None;
        runs.push((format!("eps {:.6}", eps * f), s, false));
    }
    let mut unbounded = base.clone();
    // Linf 1 reaches every image; L2 and L1 reach it at the image's norm.
    unbounded.budget.eps = match base.budget.norm {
        crate::attacks::Norm::Linf => 1.0,
        _ => (x.numel() / m) as f64,
    };
    unbounded.step_size = None;
    runs.push(("eps unbounded".into(), unbounded, false));
    let mut twice = base.clone();
    twice.steps = Some(2 * steps);
    runs.push((format!("iterations {}", 2 * steps), twice, false));
    if state.stochastic {
        let mut more = base.clone();
        more.eot = 2 * eot;
        runs.push((format!("eot {}", 2 * eot), more, false));
        let mut one = base.clone();
        one.eot = 1;
        runs.push(("fixed draw".into(), one, true));
    }
    let bar = crate::progress::bar(runs.len() as u64, "check runs");
    for (name, settings, fixed) in &runs {
        if state.check_runs.contains_key(name) {
            bar.inc(1);
            continue;
        }
        let acc = if *fixed {
            let f = FixedDraw {
                inner: model,
                seed: (config.seed ^ 0x0F1D) as i64,
            };
            pgd_accuracy(&f, &f, &x, &y, settings, config, 1)?
        } else {
            pgd_accuracy(model, model, &x, &y, settings, config, draws)?
        };
        tracing::info!(
            "check run {name}: single-draw accuracy {:.2} %",
            100.0 * acc
        );
        state.check_runs.insert(name.clone(), acc);
        save_state(state_dir, state)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let get = |name: &str| state.check_runs.get(name).copied();
    let mut curves = CheckCurves {
        points: m,
        ..Default::default()
    };
    for (name, s, _) in &runs {
        let Some(acc) = get(name) else { continue };
        if name.starts_with("eps") {
            curves.eps.push((s.budget.eps, acc));
        }
    }
    // The base point of the iteration and EOT curves is the eps x 1 run.
    let at_eps = get(&format!("eps {eps:.6}"));
    if let Some(a) = at_eps {
        curves.iterations.push((steps as f64, a));
        curves.eot.push((eot as f64, a));
    }
    if let Some(a) = get(&format!("iterations {}", 2 * steps)) {
        curves.iterations.push((2.0 * steps as f64, a));
    }
    if let Some(a) = get(&format!("eot {}", 2 * eot)) {
        curves.eot.push((2.0 * eot as f64, a));
    }
    curves.fixed_draw = get("fixed draw");
    Ok(curves)
}

fn finish(
    state: &State,
    labels: &[i64],
    owned: &[usize],
    model: &dyn Model,
    curves: CheckCurves,
    seconds: f64,
) -> Result<RobustEvaluation> {
    let take = |v: &Option<Draws>| v.clone().context("an unfinished batch");
    let records = owned
        .iter()
        .map(|&i| {
            Ok(PointRecord {
                position: i,
                index: state.indices[i],
                label: labels[i],
                clean: take(&state.clean[i])?,
                attacks: state
                    .done
                    .iter()
                    .map(|a| take(&a[i]))
                    .collect::<Result<_>>()?,
                perturbation_norms: state.norms.iter().map(|a| a[i]).collect(),
                claimed: state.claimed.iter().map(|a| a[i]).collect(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let per_attack = state
        .grad
        .iter()
        .copied()
        .zip(state.seconds.iter().copied())
        .collect();
    Ok(assemble(Parts {
        config: state.config.clone(),
        shard: state.shard,
        indices: state.indices.clone(),
        stochastic: state.stochastic,
        max_logit_change: state.max_logit_change,
        declared_stochastic: model.is_stochastic(),
        classes: model.num_classes(),
        records,
        per_attack,
        curves,
        seconds,
    }))
}

/// What an evaluation (or the merge of its shards) is computed from.
struct Parts {
    config: RobustConfig,
    shard: Option<Shard>,
    indices: Vec<usize>,
    stochastic: bool,
    max_logit_change: f64,
    declared_stochastic: bool,
    classes: usize,
    records: Vec<PointRecord>,
    /// Per attack: gradient statistics and seconds.
    per_attack: Vec<(GradStats, f64)>,
    curves: CheckCurves,
    seconds: f64,
}

/// Scores, worst case and checks from per-point records.
fn assemble(p: Parts) -> RobustEvaluation {
    let cfg = &p.config;
    let score = |draws: &dyn Fn(&PointRecord) -> &Draws| {
        let correct: Vec<Vec<bool>> = p
            .records
            .iter()
            .map(|r| draws(r).correct(r.label))
            .collect();
        let majority: Vec<bool> = p
            .records
            .iter()
            .map(|r| draws(r).majority_correct(r.label))
            .collect();
        (correct, majority)
    };
    let (clean_correct, clean_majority) = score(&|r| &r.clean);
    let mut worst_correct = clean_correct.clone();
    let mut worst_majority = clean_majority.clone();
    let mut attacks = Vec::new();
    for (ai, spec) in cfg.attacks.iter().enumerate() {
        let (c, m) = score(&|r| &r.attacks[ai]);
        for i in 0..p.records.len() {
            for (w, v) in worst_correct[i].iter_mut().zip(&c[i]) {
                *w &= *v;
            }
            worst_majority[i] &= m[i];
        }
        let settings = attack_settings(cfg, spec, p.stochastic);
        let (grad, seconds) = p.per_attack[ai];
        let cost = cost(spec.attack, &settings);
        attacks.push(AttackResult {
            attack: spec.label(),
            target: spec.target,
            scores: Scores::from(&c, &m),
            seconds,
            grad,
            budget: cost.words,
            eot: settings.eot,
            gradient_evaluations_per_point: cost.gradients,
            queries_per_point: cost.queries,
        });
    }
    let mut evaluation = RobustEvaluation {
        config: p.config.clone(),
        shard: p.shard,
        n: p.records.len(),
        indices: p.indices,
        declared_stochastic: p.declared_stochastic,
        classes: p.classes,
        stochastic: p.stochastic,
        max_logit_change: p.max_logit_change,
        clean: Scores::from(&clean_correct, &clean_majority),
        attacks,
        worst_case: Scores::from(&worst_correct, &worst_majority),
        checks: Vec::new(),
        curves: p.curves,
        records: p.records,
        seconds: p.seconds,
    };
    evaluation.checks = checks(&evaluation);
    evaluation
}

/// The whole evaluation from all its shards (any order): the same records, scores and checks
/// as an unsharded run; gradient statistics and seconds are summed.
pub fn merge(mut shards: Vec<RobustEvaluation>) -> Result<RobustEvaluation> {
    let Some(first) = shards.first() else {
        bail!("nothing to merge");
    };
    let count = match first.shard {
        Some(s) => s.count,
        None => bail!("not a shard: an evaluation run without --shard needs no merge"),
    };
    for e in &shards {
        if e.config != first.config || e.indices != first.indices {
            bail!(
                "shards of different evaluations (settings, model, data or points differ): {} vs {}",
                e.config.model,
                first.config.model
            );
        }
        if e.stochastic != first.stochastic || e.classes != first.classes {
            bail!("shards of different models (measured randomness or classes differ)");
        }
        match e.shard {
            Some(s) if s.count == count => {}
            _ => bail!("shards split {count} ways and otherwise mixed"),
        }
    }
    shards.sort_by_key(|e| e.shard.map_or(0, |s| s.index));
    let got: Vec<usize> = shards
        .iter()
        .filter_map(|e| e.shard.map(|s| s.index))
        .collect();
    if got != (0..count).collect::<Vec<_>>() {
        bail!("expected shards 0..{count} once each, got {got:?}");
    }
    let n = shards[0].indices.len();
    let mut records: Vec<PointRecord> = shards.iter().flat_map(|e| e.records.clone()).collect();
    records.sort_by_key(|r| r.position);
    if records.len() != n || records.iter().enumerate().any(|(i, r)| r.position != i) {
        bail!("the shards' points do not cover the {n} evaluated points exactly once");
    }
    let attacks = shards[0].config.attacks.len();
    let mut per_attack = vec![(GradStats::default(), 0.0); attacks];
    for e in &shards {
        for (ai, a) in e.attacks.iter().enumerate() {
            per_attack[ai].0.add(a.grad);
            per_attack[ai].1 += a.seconds;
        }
    }
    let first = &shards[0];
    Ok(assemble(Parts {
        config: first.config.clone(),
        shard: None,
        indices: first.indices.clone(),
        stochastic: first.stochastic,
        max_logit_change: first.max_logit_change,
        declared_stochastic: first.declared_stochastic,
        classes: first.classes,
        records,
        per_attack,
        curves: first.curves.clone(),
        seconds: shards.iter().map(|e| e.seconds).sum(),
    }))
}

/// Gradient evaluations per point an attack spends at most (steps x EOT x restarts), where
/// the attack has such a budget.
/// The settings an attack of `config` runs with: its overrides applied, and one EOT draw
/// where more are the same draw (the classifier alone; a model measured deterministic).
fn attack_settings(config: &RobustConfig, spec: &AttackSpec, stochastic: bool) -> AttackSettings {
    let mut s = config.settings.for_attack(spec.attack);
    if spec.target == Target::Transfer || !stochastic {
        s.eot = 1;
    }
    s
}

/// The smallest EOT of the whole-model gradient attacks (None: there are none).
fn min_white_box_eot(config: &RobustConfig, stochastic: bool) -> Option<usize> {
    config
        .attacks
        .iter()
        .filter(|a| a.target == Target::Whole && !a.black_box())
        .map(|a| attack_settings(config, a, stochastic).eot)
        .min()
}

/// What an attack may spend per point.
struct Cost {
    words: String,
    gradients: Option<usize>,
    queries: Option<usize>,
}

fn cost(attack: AttackName, s: &AttackSettings) -> Cost {
    let eot = s.eot;
    let per_draw = |steps: usize, runs: usize, what: String| Cost {
        words: format!("{what} x EOT {eot}"),
        gradients: Some(steps * runs * eot),
        queries: None,
    };
    let runs = |targets: usize| {
        let mut w = String::new();
        if targets > 1 {
            w += &format!(", {targets} targets");
        }
        if s.restarts > 1 {
            w += &format!(", {} restarts", s.restarts);
        }
        w
    };
    match attack {
        AttackName::Fgsm => per_draw(1, 1, "1 step".into()),
        AttackName::Pgd | AttackName::SelectiveEot => {
            let steps = s.steps.unwrap_or(20);
            per_draw(steps, s.restarts, format!("{steps} steps{}", runs(1)))
        }
        AttackName::ApgdCe | AttackName::ApgdDlr | AttackName::ApgdCw => {
            let steps = s.steps.unwrap_or(100);
            per_draw(steps, s.restarts, format!("{steps} iterations{}", runs(1)))
        }
        AttackName::ApgdT | AttackName::FabT => {
            let steps = s.steps.unwrap_or(100);
            per_draw(
                steps,
                s.restarts * s.targets,
                format!("{steps} iterations{}", runs(s.targets)),
            )
        }
        AttackName::Cw => {
            let steps = s.steps.unwrap_or(1000);
            per_draw(
                steps,
                s.search_steps,
                format!("{} x {steps} Adam steps", s.search_steps),
            )
        }
        AttackName::Square => Cost {
            words: format!("{} queries{}", s.queries, runs(1)),
            gradients: None,
            queries: Some(s.queries * s.restarts),
        },
    }
}

/// The sanity checks that need no further attack runs.
fn checks(e: &RobustEvaluation) -> Vec<Check> {
    let mut out = Vec::new();
    let declared = e.declared_stochastic;
    out.push(Check {
        name: "randomness".into(),
        status: if declared == e.stochastic { "PASS" } else { "WARN" }.into(),
        detail: format!(
            "two calls on the same clean images differ by up to {:.3e} in a logit: the model is {} (it declares itself {})",
            e.max_logit_change,
            if e.stochastic { "random" } else { "deterministic" },
            if declared { "random" } else { "deterministic" }
        ),
    });
    if e.stochastic
        && let Some(eot) = min_white_box_eot(&e.config, true)
    {
        out.push(Check::new(
            "eot on a random model",
            eot > 1,
            format!("the white-box attacks average at least {eot} gradient sample(s) per step"),
        ));
    }
    let (mut evals, mut bad) = (0u64, 0u64);
    for a in e.attacks.iter().filter(|a| a.target == Target::Whole) {
        evals += a.grad.evaluations;
        bad += a.grad.zero + a.grad.non_finite;
    }
    if evals > 0 {
        let share = bad as f64 / evals as f64;
        out.push(Check::new(
            "input gradients",
            share <= 0.01,
            format!(
                "{bad} of {evals} gradient evaluations ({:.1} %) were zero or not finite{}",
                100.0 * share,
                if share > 0.01 {
                    ": gradient masking; attack the offending stage with BPDA"
                } else {
                    ""
                }
            ),
        ));
    }
    // Orderings that hold for a sound evaluation, compared point by point on majority-vote
    // correctness: the weaker attack must not break more (by 2) of the points the strongest iterative
    // exact-gradient attack leaves standing (b) than the reverse (c); on a random model, not
    // clearly more (a sign test: b - c > 2 sqrt(b + c), and at least 2 points).
    let majority = |ai: usize| -> Vec<bool> {
        e.records
            .iter()
            .map(|r| r.attacks[ai].majority_correct(r.label))
            .collect()
    };
    let strongest = e
        .attacks
        .iter()
        .enumerate()
        .filter(|(_, a)| a.target == Target::Whole && a.attack != "square" && a.attack != "fgsm")
        .min_by(|a, b| a.1.scores.single.value.total_cmp(&b.1.scores.single.value))
        .map(|(i, _)| i);
    if let Some(si) = strongest {
        let strong = majority(si);
        let strong_name = e.attacks[si].attack.clone();
        for (ai, a) in e.attacks.iter().enumerate() {
            let spec = &e.config.attacks[ai];
            let (name, what) = match spec.target {
                Target::Transfer => (
                    "transfer not stronger than adaptive",
                    "a stronger transfer attack means the adaptive attacks do not find the model's own gradients",
                ),
                Target::Whole if spec.black_box() => (
                    "black-box not stronger than white-box",
                    "a stronger black-box attack is the classic sign of gradient masking",
                ),
                Target::Whole if spec.attack == AttackName::Fgsm => (
                    "single-step not stronger than iterative",
                    "a stronger single step means the iterative attacks are stuck",
                ),
                _ => continue,
            };
            let weak = majority(ai);
            let b = strong
                .iter()
                .zip(&weak)
                .filter(|(s, w)| **s && !**w)
                .count();
            let c = strong
                .iter()
                .zip(&weak)
                .filter(|(s, w)| !**s && **w)
                .count();
            // A deterministic model's outcomes are exact; only the attacks' own random starts
            // differ, so more than one point of net difference is real.
            let stronger = if e.stochastic {
                b >= c + 2 && (b - c) as f64 > 2.0 * ((b + c) as f64).sqrt()
            } else {
                b > c + 1
            };
            out.push(Check::new(
                name,
                !stronger,
                format!(
                    "{} breaks {b} point(s) that {strong_name} leaves robust, and leaves {c} robust that {strong_name} breaks (majority vote; single draw {:.2} % vs {:.2} %); WARN when clearly more: {what}",
                    a.attack,
                    100.0 * a.scores.single.value,
                    100.0 * e.attacks[si].scores.single.value
                ),
            ));
        }
    }
    out.extend(survival_checks(e));
    if e.stochastic && e.config.draws == 1 {
        out.push(Check::new(
            "scoring draws on a random model",
            false,
            "R = 1: each image is scored by one draw, so majority and worst of R are that draw, and an attack's success is set against a single fresh draw; use R >= 10".into(),
        ));
    }
    if !e.adaptive() {
        out.push(Check::new(
            "an attack on the defended model",
            false,
            "every attack differentiated the classifier alone (transfer): the scores are transfer accuracy, not robust accuracy; add pgd, selective-eot or bpda".into(),
        ));
    }
    out.extend(curve_checks(&e.curves, e.classes));
    if e.stochastic {
        let w = &e.worst_case;
        out.push(Check {
            name: "scores of a random model".into(),
            status: "INFO".into(),
            detail: format!(
                "worst case per point: single draw {:.2} %, majority {:.2} %, worst of R {:.2} %: a defence that is only robust on average is not robust on every draw",
                100.0 * w.single.value,
                100.0 * w.majority.value,
                100.0 * w.worst_of_r.value
            ),
        });
    }
    out
}

/// Does each attack's success survive fresh draws? Per point i, c_i is the share of draws the
/// attack claimed its image fools at attack time and f_i the share of the R scoring draws it
/// fools. WARN when the mean excess D = mean(c_i - f_i) exceeds both 2 points and twice its
/// standard error (sd(c - f) / sqrt(n), a one-sided test at about 2.3 %): the attack counted
/// points broken that fresh draws classify correctly, so its own idea of success rests on the
/// draws it selected on. Transfer attacks are not judged (their claims are about the classifier
/// alone); attacks without recorded claims (results before 2026-12-06) are skipped.
pub fn survival_checks(e: &RobustEvaluation) -> Vec<Check> {
    let mut out = Vec::new();
    for (ai, a) in e.attacks.iter().enumerate() {
        if a.target == Target::Transfer {
            continue;
        }
        let pairs: Vec<(f64, f64)> = e
            .records
            .iter()
            .filter_map(|r| {
                let c = r.claimed.get(ai).copied().flatten()?;
                let preds = &r.attacks[ai].preds;
                let wrong = preds.iter().filter(|&&p| p != r.label).count();
                Some((c, wrong as f64 / preds.len().max(1) as f64))
            })
            .collect();
        if pairs.len() < e.records.len() || pairs.is_empty() {
            continue;
        }
        let m = pairs.len() as f64;
        let (claimed, fresh) = (
            pairs.iter().map(|p| p.0).sum::<f64>() / m,
            pairs.iter().map(|p| p.1).sum::<f64>() / m,
        );
        let d = claimed - fresh;
        let var = pairs.iter().map(|(c, f)| (c - f - d).powi(2)).sum::<f64>() / (m - 1.0).max(1.0);
        let se = (var / m).sqrt();
        let warn = d > 0.02 && d > 2.0 * se;
        out.push(Check::new(
            &format!("{}: success survives fresh draws", a.attack),
            !warn,
            format!(
                "at attack time it counted {:.2} % of the points broken (mean share of its own draws), the {} fresh scoring draws {:.2} %: excess {:+.2} points (standard error {:.2}); WARN when the excess is above 2 points and 2 standard errors: its successes were judged on draws that fresh ones undo",
                100.0 * claimed,
                e.config.draws,
                100.0 * fresh,
                100.0 * d,
                100.0 * se
            ),
        ));
    }
    out
}

/// The checks on the check runs' curves (each needs its runs; none without them).
fn curve_checks(c: &CheckCurves, classes: usize) -> Vec<Check> {
    let mut out = Vec::new();
    let m = c.points as f64;
    if m == 0.0 {
        return out;
    }
    let tol = |p: f64| 2.0 * (p * (1.0 - p) / m).sqrt() + 0.5 / m;
    let pct = |v: &[(f64, f64)], unit: &str| {
        v.iter()
            .map(|(x, a)| format!("{x:.4}{unit}: {:.2} %", 100.0 * a))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if c.eps.len() >= 2 {
        let (bounded, unbounded) = c.eps.split_at(c.eps.len() - 1);
        let monotone = bounded.windows(2).all(|w| w[1].1 <= w[0].1 + tol(w[0].1));
        out.push(Check::new(
            "robust accuracy non-increasing in eps",
            monotone,
            format!("PGD on {} points: {}", c.points, pct(bounded, "")),
        ));
        let chance = 1.0 / classes.max(1) as f64;
        let last = unbounded[0].1;
        out.push(Check::new(
            "unbounded eps reaches chance",
            last <= chance + tol(chance),
            format!(
                "eps {:.1}: {:.2} % (chance {:.2} %); WARN above chance: the attack cannot even use an unbounded budget",
                unbounded[0].0,
                100.0 * last,
                100.0 * chance
            ),
        ));
    }
    if let [(s1, a1), (s2, a2)] = c.iterations[..] {
        out.push(Check::new(
            "doubling iterations",
            (a2 - a1).abs() <= 0.01,
            format!(
                "{s1:.0} iterations: {:.2} %, {s2:.0}: {:.2} % (WARN when more than 1 point apart: the attack had not converged)",
                100.0 * a1,
                100.0 * a2
            ),
        ));
    }
    if let [(k1, a1), (k2, a2)] = c.eot[..] {
        out.push(Check::new(
            "EOT saturation",
            (a2 - a1).abs() <= 0.01,
            format!(
                "EOT {k1:.0}: {:.2} %, EOT {k2:.0}: {:.2} % (WARN when more than 1 point apart: more samples per step still help the attacker)",
                100.0 * a1,
                100.0 * a2
            ),
        ));
    }
    if let (Some(f), Some(&(_, a))) = (c.fixed_draw, c.iterations.first()) {
        out.push(Check::new(
            "attack on one fixed draw succeeds",
            f <= a + tol(a),
            format!(
                "with the randomness fixed to one draw (attacked and scored on it): {:.2} %, vs {:.2} % on the random model; WARN when higher: the gradients themselves are broken",
                100.0 * f,
                100.0 * a
            ),
        ));
    }
    out
}

fn load_state(
    dir: Option<&Path>,
    config: &RobustConfig,
    shard: Option<Shard>,
    indices: &[usize],
) -> Result<Option<State>> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let path = dir.join(STATE);
    let Some(state) = crate::io::read_json_opt::<State>(&path, "a robust-evaluation state file")?
    else {
        return Ok(None);
    };
    if &state.config != config || state.indices != indices || state.shard != shard {
        bail!(
            "{} holds an evaluation with different settings (attacks, budgets, draws, seed, model, data or shard); resume it with the same settings or choose another --out",
            path.display()
        );
    }
    let n = indices.len();
    let attacks = config.attacks.len();
    let corrupt = |what: String| {
        anyhow::anyhow!(
            "{}: {what}: the resume state is corrupt; delete {} to start over",
            path.display(),
            dir.display()
        )
    };
    for (field, len, want) in [
        ("clean", state.clean.len(), n),
        ("done", state.done.len(), attacks),
        ("norms", state.norms.len(), attacks),
        ("grad", state.grad.len(), attacks),
        ("seconds", state.seconds.len(), attacks),
    ] {
        if len != want {
            return Err(corrupt(format!(
                "{field} holds {len} entries, expected {want} ({n} points, {attacks} attacks)"
            )));
        }
    }
    let mut state = state;
    if state.claimed.is_empty() {
        // Written before claims were recorded: the finished batches have none.
        state.claimed = vec![vec![None; n]; attacks];
    }
    if state.claimed.len() != attacks || state.claimed.iter().any(|c| c.len() != n) {
        return Err(corrupt(format!(
            "claimed holds {} lists, expected {attacks} of {n} entries",
            state.claimed.len()
        )));
    }
    for (ai, (done, norms)) in state.done.iter().zip(&state.norms).enumerate() {
        if done.len() != n || norms.len() != n {
            return Err(corrupt(format!(
                "done[{ai}] / norms[{ai}] hold {} / {} entries, expected {n} (one per point)",
                done.len(),
                norms.len()
            )));
        }
    }
    let draws = std::iter::once(("clean".to_string(), &state.clean)).chain(
        state
            .done
            .iter()
            .enumerate()
            .map(|(ai, d)| (format!("done[{ai}]"), d)),
    );
    for (field, list) in draws {
        for (i, d) in list.iter().enumerate() {
            if let Some(d) = d
                && d.preds.len() != config.draws
            {
                return Err(corrupt(format!(
                    "{field}[{i}] holds {} predictions, expected R = {}",
                    d.preds.len(),
                    config.draws
                )));
            }
        }
    }
    tracing::info!("resuming the evaluation in {}", dir.display());
    Ok(Some(state))
}

fn save_state(dir: Option<&Path>, state: &State) -> Result<()> {
    match dir {
        Some(d) => crate::io::write_json(&d.join(STATE), state),
        None => Ok(()),
    }
}

/// The path of batch file `file` of the state in `dir`.
fn batch_file(dir: Option<&Path>, file: &str) -> PathBuf {
    dir.unwrap_or(Path::new(".")).join(BATCHES).join(file)
}

/// (attack index, first point, images) of a batch file named `AA-SSSSSS.safetensors`,
/// checked against the run: an attack of the config, a batch of the points (its first point
/// and length), one image of the points' shape per point.
fn read_batch(
    dir: Option<&Path>,
    file: &str,
    config: &RobustConfig,
    x: &Tensor,
) -> Result<(usize, usize, Tensor)> {
    let dir = dir.context("batch files without a state folder")?;
    let path: PathBuf = batch_file(Some(dir), file);
    let corrupt = |what: String| {
        anyhow::anyhow!(
            "{}: {what}: the resume state is corrupt; delete {} to start over",
            path.display(),
            dir.display()
        )
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (a, s) = file
        .strip_suffix(".safetensors")
        .and_then(|stem| stem.split_once('-'))
        .filter(|(a, s)| digits(a) && digits(s))
        .and_then(|(a, s)| Some((a.parse::<usize>().ok()?, s.parse::<usize>().ok()?)))
        .ok_or_else(|| {
            corrupt("unexpected batch file name (expected AA-SSSSSS.safetensors)".into())
        })?;
    let n = x.size()[0] as usize;
    if a >= config.attacks.len() {
        return Err(corrupt(format!(
            "the batch is from attack {a}, but the evaluation has {} attacks (0 to {})",
            config.attacks.len(),
            config.attacks.len() - 1
        )));
    }
    if s >= n || !s.is_multiple_of(config.batch_size) {
        return Err(corrupt(format!(
            "the batch starts at point {s}, which does not start a batch of {} among the {n} points",
            config.batch_size
        )));
    }
    let t = crate::models::checkpoint::read_tensors(&path)?;
    let images = t
        .into_iter()
        .find(|(n, _)| n == "images")
        .map(|(_, v)| v)
        .with_context(|| format!("{}: no tensor 'images'", path.display()))?;
    let mut want = x.size();
    want[0] = (n - s).min(config.batch_size) as i64;
    if images.size() != want {
        return Err(corrupt(format!(
            "images have shape {:?}; expected {want:?} (points {s} to {} of {n})",
            images.size(),
            s as i64 + want[0] - 1
        )));
    }
    let images = images.to_kind(Kind::Float);
    if !bool::try_from(images.isfinite().all())? {
        return Err(corrupt("images hold NaN or infinite values".into()));
    }
    Ok((a, s, images))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_needs_a_strict_plurality_of_the_truth() {
        let d = |p: &[i64]| Draws { preds: p.to_vec() };
        assert!(d(&[1, 1, 2]).majority_correct(1));
        assert!(!d(&[1, 2, 2]).majority_correct(1));
        // A tie is not a win.
        assert!(!d(&[1, 2]).majority_correct(1));
        // A plurality below one half still wins.
        assert!(d(&[1, 1, 2, 3, 4]).majority_correct(1));
        assert_eq!(d(&[3, 2, 2, 3]).plurality(), 2);
    }

    #[test]
    fn scores_follow_their_definitions() {
        // 4 points x 3 draws.
        let correct = vec![
            vec![true, true, true],
            vec![true, false, true],
            vec![false, false, true],
            vec![false, false, false],
        ];
        let majority = vec![true, true, false, false];
        let s = Scores::from(&correct, &majority);
        assert_eq!(s.worst_of_r.k, 1);
        assert_eq!(s.majority.k, 2);
        // Per draw: 2/4, 1/4, 3/4.
        assert!((s.single.value - 0.5).abs() < 1e-12);
        assert!((s.single_std - 0.25).abs() < 1e-12);
        assert!(s.worst_of_r.value <= s.single.value);
        assert!(s.single.lo < s.single.value && s.single.value < s.single.hi);
    }

    #[test]
    fn attack_lists_parse_with_transfer_and_refuse_repeats() {
        let mut s = AttackSettings::new(
            crate::attacks::Budget::new(crate::attacks::Norm::Linf, 0.03).unwrap(),
        );
        let a = parse_attacks("pgd, transfer ,apgd-dlr", &mut s).unwrap();
        let labels: Vec<String> = a.iter().map(AttackSpec::label).collect();
        assert_eq!(labels, ["pgd", "transfer-pgd", "apgd-dlr"]);
        assert!(
            parse_attacks("pgd,pgd", &mut s)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(parse_attacks("pgd,nope", &mut s).is_err());
        assert!(parse_attacks(" , ", &mut s).is_err());
        let mut s2 = s.clone();
        let rand = parse_attacks("autoattack-rand", &mut s2).unwrap();
        assert_eq!(rand.len(), 2);
        assert_eq!(s2.eot, 20);
    }
}
