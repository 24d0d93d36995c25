//! What a robust evaluation returns: per-point draws, the three scores, checks, records.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::spec::*;
use super::stats::Proportion;
use crate::attacks::GradStats;
use crate::models::Model;

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
    pub(crate) fn from(correct: &[Vec<bool>], majority: &[bool]) -> Scores {
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
    pub(crate) fn correct(&self, label: i64) -> Vec<bool> {
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
    pub(crate) fn majority_correct(&self, label: i64) -> bool {
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

pub(super) fn one() -> usize {
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
    pub(crate) fn new(name: &str, pass: bool, detail: String) -> Check {
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
    pub(crate) fn majority_clean_right(&self) -> bool {
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

/// R seeded draws of `model` on a batch: the predictions per image. The seed depends on the
/// evaluation seed, the image set (`slot`: clean or an attack) and the batch, so a resumed run
/// draws the same.
pub(super) fn draw(
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
        let want = [n as i64, model.num_classes() as i64];
        if logits.size() != want {
            bail!(
                "the model returned logits of shape {:?} for {n} images; expected {want:?}",
                logits.size()
            );
        }
        let p = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))?;
        for (i, v) in p.into_iter().enumerate() {
            preds[i].push(v);
        }
    }
    Ok(preds.into_iter().map(|preds| Draws { preds }).collect())
}

/// Two calls on the same clean images (up to one batch): whether they differ, and by how much.
pub(super) fn measure_randomness(
    model: &dyn Model,
    x: &Tensor,
    batch: usize,
    seed: u64,
) -> Result<(bool, f64)> {
    let len = (x.size()[0] as usize).min(batch) as i64;
    crate::attacks::select::measure_randomness(model, &x.narrow(0, 0, len), seed)
}
