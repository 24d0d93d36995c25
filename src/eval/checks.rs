//! The sanity checks, measured not declared, and the PGD runs some of them need on the check
//! points (started by the run in robust.rs, which saves their progress).

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::scores::*;
use super::spec::*;
use crate::attacks::{AttackName, AttackSettings};
use crate::models::{Measured, Model};

/// The model with its randomness fixed: every call draws the same transform (reseeded).
pub(super) struct FixedDraw<'a> {
    pub(super) inner: &'a dyn Model,
    pub(super) seed: i64,
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
pub(super) fn pgd_accuracy(
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

/// The sanity checks that need no further attack runs.
pub(super) fn checks(e: &RobustEvaluation) -> Vec<Check> {
    let mut out = vec![randomness_check(e)];
    out.extend(eot_check(e));
    out.extend(gradient_check(e));
    out.extend(ordering_checks(e));
    out.extend(survival_checks(e));
    out.extend(one_draw_check(e));
    out.extend(adaptive_check(e));
    out.extend(curve_checks(&e.curves, e.classes));
    out.extend(random_scores_info(e));
    out
}

/// Measured randomness against what the model declares.
fn randomness_check(e: &RobustEvaluation) -> Check {
    let declared = e.declared_stochastic;
    Check {
        name: "randomness".into(),
        status: if declared == e.stochastic {
            "PASS"
        } else {
            "WARN"
        }
        .into(),
        detail: format!(
            "two calls on the same clean images differ by up to {:.3e} in a logit: the model is {} (it declares itself {})",
            e.max_logit_change,
            if e.stochastic {
                "random"
            } else {
                "deterministic"
            },
            if declared { "random" } else { "deterministic" }
        ),
    }
}

/// On a random model, the white-box attacks average more than one gradient sample per step.
fn eot_check(e: &RobustEvaluation) -> Option<Check> {
    let eot = min_white_box_eot(&e.config, true).filter(|_| e.stochastic)?;
    Some(Check::new(
        "eot on a random model",
        eot > 1,
        format!("the white-box attacks average at least {eot} gradient sample(s) per step"),
    ))
}

/// At most 1 % of the whole-model gradient evaluations zero or not finite.
fn gradient_check(e: &RobustEvaluation) -> Option<Check> {
    let (mut evals, mut bad) = (0u64, 0u64);
    for a in e.attacks.iter().filter(|a| a.target == Target::Whole) {
        evals += a.grad.evaluations;
        bad += a.grad.zero + a.grad.non_finite;
    }
    if evals == 0 {
        return None;
    }
    let share = bad as f64 / evals as f64;
    Some(Check::new(
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
    ))
}

/// Orderings that hold for a sound evaluation, compared point by point on majority-vote
/// correctness: the weaker attack (transfer, black-box, single-step) must not break more (by 2)
/// of the points the strongest iterative exact-gradient attack leaves standing (b) than the
/// reverse (c); on a random model, not clearly more (a sign test: b - c > 2 sqrt(b + c), and
/// at least 2 points).
fn ordering_checks(e: &RobustEvaluation) -> Vec<Check> {
    let majority = |ai: usize| -> Vec<bool> {
        e.records
            .iter()
            .map(|r| r.attacks[ai].majority_correct(r.label))
            .collect()
    };
    let Some(si) = e
        .attacks
        .iter()
        .enumerate()
        .filter(|(_, a)| a.target == Target::Whole && a.attack != "square" && a.attack != "fgsm")
        .min_by(|a, b| a.1.scores.single.value.total_cmp(&b.1.scores.single.value))
        .map(|(i, _)| i)
    else {
        return Vec::new();
    };
    let strong = majority(si);
    let strong_name = e.attacks[si].attack.clone();
    let mut out = Vec::new();
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
    out
}

/// R = 1 on a random model: nothing fresh to judge an attack's success on.
fn one_draw_check(e: &RobustEvaluation) -> Option<Check> {
    (e.stochastic && e.config.draws == 1).then(|| {
        Check::new(
            "scoring draws on a random model",
            false,
            "R = 1: each image is scored by one draw, so majority and worst of R are that draw, and an attack's success is set against a single fresh draw; use R >= 10".into(),
        )
    })
}

/// Transfer attacks alone give transfer accuracy, not robust accuracy.
fn adaptive_check(e: &RobustEvaluation) -> Option<Check> {
    (!e.adaptive()).then(|| {
        Check::new(
            "an attack on the defended model",
            false,
            "every attack differentiated the classifier alone (transfer): the scores are transfer accuracy, not robust accuracy; add pgd, selective-eot or bpda".into(),
        )
    })
}

/// On a random model, the three worst-case scores side by side.
fn random_scores_info(e: &RobustEvaluation) -> Option<Check> {
    let w = &e.worst_case;
    e.stochastic.then(|| Check {
        name: "scores of a random model".into(),
        status: "INFO".into(),
        detail: format!(
            "worst case per point: single draw {:.2} %, majority {:.2} %, worst of R {:.2} %: a defence that is only robust on average is not robust on every draw",
            100.0 * w.single.value,
            100.0 * w.majority.value,
            100.0 * w.worst_of_r.value
        ),
    })
}

/// Per point (claimed, fresh) shares of draws fooled: their means, the mean excess of the claims
/// and its standard error (sd(c - f) / sqrt(n)).
#[derive(Debug, Clone, Copy)]
pub struct ClaimExcess {
    pub claimed: f64,
    pub fresh: f64,
    pub excess: f64,
    pub se: f64,
}

impl ClaimExcess {
    pub fn of(pairs: &[(f64, f64)]) -> ClaimExcess {
        let m = pairs.len().max(1) as f64;
        let claimed = pairs.iter().map(|p| p.0).sum::<f64>() / m;
        let fresh = pairs.iter().map(|p| p.1).sum::<f64>() / m;
        let d = claimed - fresh;
        let var = pairs.iter().map(|(c, f)| (c - f - d).powi(2)).sum::<f64>() / (m - 1.0).max(1.0);
        ClaimExcess {
            claimed,
            fresh,
            excess: d,
            se: (var / m).sqrt(),
        }
    }
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
        let ClaimExcess {
            claimed,
            fresh,
            excess: d,
            se,
        } = ClaimExcess::of(&pairs);
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
pub(super) fn curve_checks(c: &CheckCurves, classes: usize) -> Vec<Check> {
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
