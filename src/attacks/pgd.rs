//! PGD (Madry et al. 2018): iterated steepest-ascent steps projected back onto the eps-ball,
//! from a random start, with restarts. On a deterministic model a sample counts as broken as
//! soon as any iterate is misclassified (or reaches the target); that iterate is the one
//! returned. On a random model the iterate returned follows the selection rule of
//! [`super::select`] (by default the last iterate), and success is claimed on fresh draws.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::grad::{GradStats, evaluate};
use super::loss::{self, LossKind};
use super::select::{Keeper, Selection, claim_of, reclaim};
use super::{Attack, AttackOutput, Budget, on_remaining};
use crate::models::Model;

pub struct Pgd {
    pub budget: Budget,
    pub steps: usize,
    pub step_size: f64,
    pub random_start: bool,
    pub restarts: usize,
    pub loss: LossKind,
    /// Targeted mode: per-sample target classes.
    pub target: Option<Tensor>,
    pub eot: usize,
    /// The iterate returned on a random model.
    pub selection: Selection,
}

impl Pgd {
    /// One run from one start on a batch: (returned images, claims). On a deterministic model,
    /// succeeding samples return their first successful iterate (claim 1), the others the last
    /// iterate (claim 0); on a random one, the [`Keeper`] chooses.
    fn single_run(
        &self,
        model: &dyn Model,
        x: &Tensor,
        y: &Tensor,
        target: Option<&Tensor>,
        stats: &mut GradStats,
    ) -> (Tensor, Tensor) {
        let Budget { norm, eps } = self.budget;
        let objective = |z: &Tensor| match (target, self.loss) {
            (None, LossKind::Ce) => loss::ce(z, y),
            (None, LossKind::Margin) => loss::margin(z, y),
            (Some(t), LossKind::Ce) => loss::ce_targeted(z, t),
            (Some(t), LossKind::Margin) => loss::margin_targeted(z, t),
        };
        let success = |logits: &Tensor| {
            let pred = logits.argmax(-1, false);
            match target {
                Some(t) => pred.eq_tensor(t),
                None => pred.ne_tensor(y),
            }
        };
        let mut adv = if self.random_start {
            norm.random_start(x, eps)
        } else {
            x.copy()
        };
        if let Some(mut keep) = Keeper::for_model(model, self.selection, self.eot, &adv) {
            for _ in 0..self.steps {
                let e = evaluate(model, &adv, y, &objective, self.eot, stats);
                keep.offer(&adv, &e.draws, &e.loss, &success, None);
                adv = norm.project(&(&adv + norm.direction(&e.grad) * self.step_size), x, eps);
            }
            keep.offer_fresh(model, &adv, &objective, &success, None);
            return keep.finish(model, &success);
        }
        let mut found = x.copy();
        let mut done = Tensor::zeros([x.size()[0]], (Kind::Bool, x.device()));
        for _ in 0..self.steps {
            let e = evaluate(model, &adv, y, &objective, self.eot, stats);
            let hit = success(&e.logits).logical_and(&done.logical_not());
            found = adv.where_self(&hit.view([-1, 1, 1, 1]), &found);
            done = done.logical_or(&hit);
            adv = norm.project(&(&adv + norm.direction(&e.grad) * self.step_size), x, eps);
        }
        // The final iterate: returned for every sample no earlier iterate broke.
        let last = tch::no_grad(|| model.logits(&adv));
        let out = found.where_self(&done.view([-1, 1, 1, 1]), &adv);
        (out, claim_of(&done.logical_or(&success(&last))))
    }
}

impl Attack for Pgd {
    fn name(&self) -> String {
        format!(
            "pgd-{}{}",
            self.steps,
            if self.target.is_some() {
                "-targeted"
            } else {
                ""
            }
        )
    }
    fn budget(&self) -> Budget {
        self.budget
    }
    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<AttackOutput> {
        let mut stats = GradStats::default();
        let (x_adv, mut claimed) = on_remaining(x, y, self.restarts, seed, |_, idx, xs, ys| {
            let target = self.target.as_ref().map(|t| t.index_select(0, idx));
            self.single_run(model, xs, ys, target.as_ref(), &mut stats)
        });
        if self.restarts > 1 {
            let fooled = |z: &Tensor| {
                let pred = z.argmax(-1, false);
                match &self.target {
                    Some(t) => pred.eq_tensor(t),
                    None => pred.ne_tensor(y),
                }
            };
            claimed = reclaim(model, self.selection, self.eot, &x_adv, claimed, &fooled);
        }
        Ok(AttackOutput {
            x_adv,
            claimed,
            grad: stats,
        })
    }
}
