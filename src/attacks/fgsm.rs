//! FGSM (Goodfellow et al. 2015): one step of size eps along the steepest-ascent direction of
//! the cross-entropy (sign of the gradient for Linf, normalised gradient for L2).

use anyhow::Result;
use tch::Tensor;

use super::grad::{GradStats, evaluate};
use super::select::{Keeper, Selection, claim_of};
use super::{Attack, AttackOutput, Budget, loss};
use crate::models::Model;

pub struct Fgsm {
    pub budget: Budget,
    pub eot: usize,
    /// Only the claim depends on it (FGSM has one iterate): on a random model, the share of
    /// fresh draws fooled.
    pub selection: Selection,
}

impl Attack for Fgsm {
    fn name(&self) -> String {
        "fgsm".into()
    }
    fn budget(&self) -> Budget {
        self.budget
    }
    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, _seed: u64) -> Result<AttackOutput> {
        let Budget { norm, eps } = self.budget;
        let mut stats = GradStats::default();
        let e = evaluate(model, x, y, &|z| loss::ce(z, y), self.eot, &mut stats);
        let x_adv = norm.project(&(x + norm.direction(&e.grad) * eps), x, eps);
        let fooled = |z: &Tensor| z.argmax(-1, false).ne_tensor(y);
        let claimed = match Keeper::for_model(model, self.selection, self.eot, &x_adv) {
            Some(keep) => keep.finish(model, &fooled).1,
            None => claim_of(&fooled(&tch::no_grad(|| model.logits(&x_adv)))),
        };
        Ok(AttackOutput {
            x_adv,
            claimed,
            grad: stats,
        })
    }
}
