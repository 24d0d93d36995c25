//! FGSM (Goodfellow et al. 2015): one step of size eps along the steepest-ascent direction of
//! the cross-entropy (sign of the gradient for Linf, normalised gradient for L2).

use anyhow::Result;
use tch::Tensor;

use super::grad::{GradStats, evaluate};
use super::{Attack, AttackOutput, Budget, loss};
use crate::models::Model;

pub struct Fgsm {
    pub budget: Budget,
    pub eot: usize,
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
        Ok(AttackOutput { x_adv, grad: stats })
    }
}
