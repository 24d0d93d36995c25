//! What an attack returns, and claims, on a random model: one rule for every attack.
//!
//! On a deterministic model an attack's bookkeeping is exact: an iterate that is misclassified
//! stays misclassified, so each attack keeps its reference behaviour (the first or latest
//! misclassified iterate, the smallest adversarial), which the agreement tests with torchattacks
//! and AutoAttack pin. On a model measured random, one pass that misclassifies an iterate says
//! little: most fresh draws classify it correctly again, and an attack that stops there
//! reports a success the scoring draws undo. There every attack hands its candidates to a
//! [`Keeper`], which
//! - keeps per point the candidate chosen by the [`Selection`] rule (by default the last
//!   iterate; or the one whose K EOT draws were fooled most often),
//! - and claims for the returned image the share of K *fresh* draws it fools, so that an
//!   attack's own idea of success (and the restarts it skips) never hangs on the draws it
//!   selected on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::grad;
use crate::models::Model;

/// Which iterate an attack returns per point on a model measured random.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// The last iterate, as Madry et al.'s PGD and torchattacks' EOTPGD return it (minimum-norm
    /// attacks: see [`Selection::for_min_norm`]). The default: at least as strong as
    /// most-fooled on every score where measured, and stronger on one model (docs/evaluation.md).
    #[default]
    Last,
    /// The candidate whose K EOT draws were fooled most often (ties: the larger mean
    /// objective, then the later candidate).
    MostFooled,
    /// The first iterate whose EOT-averaged logits were misclassified, as on a deterministic
    /// model: atop's rule before 2026-12-06, which fresh draws mostly undo. Kept to measure
    /// against, not to evaluate with.
    FirstDraw,
}

impl Selection {
    pub const ALL: &'static [(&'static str, Selection)] = &[
        ("last", Selection::Last),
        ("most-fooled", Selection::MostFooled),
        ("first-draw", Selection::FirstDraw),
    ];

    /// Results written before the rule existed were made with the first-draw rule.
    pub fn before_rule() -> Selection {
        Selection::FirstDraw
    }

    /// The rule of a minimum-norm attack (FAB, C&W), whose iterates are pulled back towards the
    /// clean image once adversarial, so that its last one inside the budget is often the least
    /// adversarial: there `last` keeps the most-fooled candidate inside the budget.
    pub fn for_min_norm(self) -> Selection {
        match self {
            Selection::Last => Selection::MostFooled,
            other => other,
        }
    }

    /// The rule of an attack defined for random models alone (selective EOT): it never had the
    /// first-draw rule, so `first-draw` keeps the most-fooled candidate there.
    pub fn for_random_only(self) -> Selection {
        match self {
            Selection::FirstDraw => Selection::MostFooled,
            other => other,
        }
    }
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Selection::ALL
            .iter()
            .find(|(_, s)| s == self)
            .map(|(n, _)| *n)
            .expect("every rule is listed");
        f.write_str(name)
    }
}

impl FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        Selection::ALL
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, r)| *r)
            .ok_or_else(|| {
                let names: Vec<&str> = Selection::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown selection '{s}': expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Judges which draws a candidate fooled: logits N x C -> N booleans.
pub type Fooled<'a> = &'a dyn Fn(&Tensor) -> Tensor;

/// Per point, the candidate an attack returns on a random model (see the module docs).
pub struct Keeper {
    rule: Selection,
    /// Fresh draws per estimate (the attack's EOT, at least 1).
    eot: usize,
    images: Tensor,
    /// Share of its K draws the kept candidate fooled; -1 until one is offered.
    fooled: Tensor,
    /// Its mean objective over those draws (the tie-break).
    objective: Tensor,
}

impl Keeper {
    /// A keeper for an attack on `model` starting from `x`, or `None` where the attack keeps
    /// its own deterministic bookkeeping: on a model that is not random (as measured by the
    /// evaluation, see [`crate::models::Measured`]) or with the first-draw rule.
    pub fn for_model(model: &dyn Model, rule: Selection, eot: usize, x: &Tensor) -> Option<Self> {
        (model.is_stochastic() && rule != Selection::FirstDraw).then(|| Keeper::new(rule, eot, x))
    }

    /// A keeper whatever the model (attacks defined by the rule itself: selective EOT).
    pub fn new(rule: Selection, eot: usize, x: &Tensor) -> Self {
        let n = x.size()[0];
        let opts = (Kind::Float, x.device());
        Keeper {
            rule,
            eot: eot.max(1),
            images: x.detach().copy(),
            fooled: Tensor::full([n], -1.0, opts),
            objective: Tensor::full([n], f64::NEG_INFINITY, opts),
        }
    }

    /// Offers `images` whose K draws gave `draws` (K x N x C logits) and mean `objective` (N
    /// values, to be maximised); `eligible` (N booleans) limits the offer to some points (a
    /// minimum-norm attack's iterates inside the budget).
    pub fn offer(
        &mut self,
        images: &Tensor,
        draws: &Tensor,
        objective: &Tensor,
        fooled: Fooled<'_>,
        eligible: Option<&Tensor>,
    ) {
        let share = share_fooled(draws, fooled);
        let objective = objective
            .detach()
            .to_kind(Kind::Float)
            .nan_to_num(0.0, 0.0, 0.0);
        let mut take = match self.rule {
            Selection::Last => share.ones_like().to_kind(Kind::Bool),
            // Ties in share go to the larger objective, and equal objectives to the newcomer.
            _ => share.gt_tensor(&self.fooled).logical_or(
                &share
                    .eq_tensor(&self.fooled)
                    .logical_and(&objective.ge_tensor(&self.objective)),
            ),
        };
        if let Some(e) = eligible {
            take = take.logical_and(e);
        }
        self.images = images
            .detach()
            .where_self(&take.view([-1, 1, 1, 1]), &self.images);
        self.fooled = share.where_self(&take, &self.fooled);
        self.objective = objective.where_self(&take, &self.objective);
    }

    /// Offers `images` judged on K fresh draws of `model` (forward passes only), with the mean
    /// of `objective` over them.
    pub fn offer_fresh(
        &mut self,
        model: &dyn Model,
        images: &Tensor,
        objective: &dyn Fn(&Tensor) -> Tensor,
        fooled: Fooled<'_>,
        eligible: Option<&Tensor>,
    ) {
        let draws = grad::predict(model, images, self.eot);
        let k = draws.size()[0];
        let mean = (0..k)
            .map(|j| objective(&draws.get(j)).to_kind(Kind::Float))
            .reduce(|a, b| a + b)
            .expect("at least one draw")
            / k as f64;
        self.offer(images, &draws, &mean, fooled, eligible);
    }

    /// The kept images and the attack's claim for them: the share of K fresh draws of `model`
    /// each one fools (never the draws it was selected on).
    pub fn finish(self, model: &dyn Model, fooled: Fooled<'_>) -> (Tensor, Tensor) {
        let claimed = share_fooled(&grad::predict(model, &self.images, self.eot), fooled);
        (self.images, claimed)
    }
}

/// The claims for images chosen among several attempts (restarts, target classes) by their
/// claims: measured again on K fresh draws on a random model, since picking the best of several
/// noisy estimates favours lucky ones. Elsewhere the claims stand.
pub fn reclaim(
    model: &dyn Model,
    rule: Selection,
    eot: usize,
    images: &Tensor,
    claimed: Tensor,
    fooled: Fooled<'_>,
) -> Tensor {
    if model.is_stochastic() && rule != Selection::FirstDraw {
        share_fooled(&grad::predict(model, images, eot.max(1)), fooled)
    } else {
        claimed
    }
}

/// Per point, the share of K draws (K x N x C logits) that `fooled` counts.
pub fn share_fooled(draws: &Tensor, fooled: Fooled<'_>) -> Tensor {
    let k = draws.size()[0];
    (0..k)
        .map(|j| fooled(&draws.get(j)).to_kind(Kind::Float))
        .reduce(|a, b| a + b)
        .expect("at least one draw")
        / k as f64
}

/// A deterministic attack's success mask as a claim (1 broken, 0 not).
pub fn claim_of(success: &Tensor) -> Tensor {
    success.to_kind(Kind::Float)
}

/// Two calls of `model` on the same images (up to 64 of them, seeded): whether they differ, and
/// by how much (the largest |logit difference|). An error if the logits are not finite.
pub fn measure_randomness(model: &dyn Model, x: &Tensor, seed: u64) -> anyhow::Result<(bool, f64)> {
    tch::manual_seed(seed as i64);
    let len = x.size()[0].min(64);
    if len == 0 {
        return Ok((false, 0.0));
    }
    let xb = x
        .narrow(0, 0, len)
        .to_device(model.device())
        .to_kind(Kind::Float);
    // libtorch's generator is process-wide: another thread reseeding it between the two calls
    // (tests run side by side in one process) makes a random model repeat itself once. Up to
    // three pairs, the stream continuing: a deterministic model agrees every time.
    let mut change = 0.0;
    for _ in 0..3 {
        let (a, b) = tch::no_grad(|| (model.logits(&xb), model.logits(&xb)));
        change = (a - b)
            .abs()
            .max()
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .double_value(&[]);
        if !change.is_finite() {
            anyhow::bail!("the model's logits on clean images are not finite");
        }
        if change > 1e-6 {
            break;
        }
    }
    Ok((change > 1e-6, change))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fooled_by(y: &Tensor) -> impl Fn(&Tensor) -> Tensor + '_ {
        move |z: &Tensor| z.argmax(-1, false).ne_tensor(y)
    }

    /// K x N x 2 logits whose draw j predicts class `preds[j][i]` for point i.
    fn draws(preds: &[&[i64]]) -> Tensor {
        let k = preds.len() as i64;
        let flat: Vec<i64> = preds.iter().flat_map(|p| p.iter().copied()).collect();
        let n = preds[0].len() as i64;
        Tensor::from_slice(&flat)
            .view([k, n])
            .one_hot(2)
            .to_kind(Kind::Float)
    }

    #[test]
    fn the_most_fooled_candidate_is_kept_ties_to_the_objective_then_the_later() {
        let y = Tensor::from_slice(&[0i64, 0, 0]);
        let f = fooled_by(&y);
        let x = Tensor::zeros([3, 1, 1, 1], (Kind::Float, Device::Cpu));
        let mut k = Keeper::new(Selection::MostFooled, 4, &x);
        let img = |v: f64| Tensor::full([3, 1, 1, 1], v, (Kind::Float, Device::Cpu));
        let obj = |v: &[f32]| Tensor::from_slice(v);
        // Candidate 1: fools 1/4, 3/4, 0/4 draws.
        k.offer(
            &img(1.0),
            &draws(&[&[1, 1, 0], &[0, 1, 0], &[0, 1, 0], &[0, 0, 0]]),
            &obj(&[0.5, 0.5, 0.5]),
            &f,
            None,
        );
        // Candidate 2: 2/4 (kept), 2/4 (not: fewer), 0/4 with a larger objective (kept).
        k.offer(
            &img(2.0),
            &draws(&[&[1, 1, 0], &[1, 1, 0], &[0, 0, 0], &[0, 0, 0]]),
            &obj(&[0.1, 0.9, 0.7]),
            &f,
            None,
        );
        // Candidate 3: ties candidate 2 on point 0 (share and objective): the later wins;
        // point 2 not eligible.
        k.offer(
            &img(3.0),
            &draws(&[&[1, 0, 1], &[1, 0, 1], &[0, 0, 1], &[0, 0, 1]]),
            &obj(&[0.1, 0.0, 9.0]),
            &f,
            Some(&Tensor::from_slice(&[true, true, false])),
        );
        let kept = Vec::<f32>::try_from(k.images.view([-1])).unwrap();
        assert_eq!(kept, [3.0, 1.0, 2.0]);
        let share = Vec::<f32>::try_from(&k.fooled).unwrap();
        assert_eq!(share, [0.5, 0.75, 0.0]);
    }

    #[test]
    fn the_last_rule_keeps_the_last_eligible_candidate() {
        let y = Tensor::from_slice(&[0i64, 0]);
        let f = fooled_by(&y);
        let x = Tensor::zeros([2, 1, 1, 1], (Kind::Float, Device::Cpu));
        let mut k = Keeper::new(Selection::Last, 1, &x);
        let img = |v: f64| Tensor::full([2, 1, 1, 1], v, (Kind::Float, Device::Cpu));
        let o = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        k.offer(&img(1.0), &draws(&[&[1, 1]]), &o, &f, None);
        k.offer(&img(2.0), &draws(&[&[0, 0]]), &o, &f, None);
        k.offer(
            &img(3.0),
            &draws(&[&[1, 1]]),
            &o,
            &f,
            Some(&Tensor::from_slice(&[false, true])),
        );
        let kept = Vec::<f32>::try_from(k.images.view([-1])).unwrap();
        assert_eq!(kept, [2.0, 3.0]);
    }

    #[test]
    fn selections_round_trip_and_refuse_nonsense() {
        for (n, s) in Selection::ALL {
            assert_eq!(s.to_string(), *n);
            assert_eq!(n.parse::<Selection>().unwrap(), *s);
        }
        assert!(
            "best"
                .parse::<Selection>()
                .unwrap_err()
                .contains("most-fooled")
        );
    }
}
