//! Selective EOT, in the spirit of DiffHammer (Wang et al., NeurIPS 2024): against a random
//! model, plain EOT averages the gradients of all K draws, and draws on which the attack has
//! no chance pull the step away from the draws it is about to fool. Here each step draws K
//! samples, ranks them per image by their loss, and follows only the gradients of the top half,
//! the draws that share the vulnerability being exploited. The image returned per sample follows
//! the rule of [`super::select`] (by default the last iterate; `most-fooled`, also for
//! `first-draw`, the iterate that fooled the largest share of its K draws), never the first
//! iterate one lucky draw misclassified; success is claimed on fresh draws.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::grad::{self, GradStats};
use super::loss;
use super::select::{Keeper, Selection};
use super::{Attack, AttackOutput, Budget};
use crate::models::Model;

pub struct SelectiveEot {
    pub budget: Budget,
    pub steps: usize,
    pub step_size: f64,
    pub random_start: bool,
    /// K: draws per step (the gradient evaluations per step, as for plain EOT).
    pub eot: usize,
    /// The iterate returned: the last, or the most-fooled one (also for `first-draw`, a rule
    /// selective EOT never had).
    pub selection: Selection,
}

impl SelectiveEot {
    /// Draws kept per step: the top half, at least one.
    fn keep(&self) -> i64 {
        self.eot.div_ceil(2).max(1) as i64
    }
}

impl Attack for SelectiveEot {
    fn name(&self) -> String {
        format!("selective-eot-{}x{}", self.steps, self.eot)
    }

    fn budget(&self) -> Budget {
        self.budget
    }

    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<AttackOutput> {
        let Budget { norm, eps } = self.budget;
        tch::manual_seed(seed as i64);
        let n = x.size()[0];
        let k = self.eot.max(1) as i64;
        let mut stats = GradStats::default();
        let mut adv = if self.random_start {
            norm.random_start(x, eps)
        } else {
            x.copy()
        };
        let mut keep = Keeper::new(self.selection.for_random_only(), k as usize, &adv);
        let fooled = |z: &Tensor| z.argmax(-1, false).ne_tensor(y);
        for _ in 0..self.steps {
            // Each draw's own gradient is needed, so each stack of copies is its own leaf.
            let (mut losses, mut grads, mut draws) = (Vec::new(), Vec::new(), Vec::new());
            for copies in grad::eot_passes(model, &adv.size(), k as usize) {
                let xg = grad::stacked(&adv.detach(), copies).set_requires_grad(true);
                let yc = grad::stacked(y, copies);
                let logits = model.logits(&xg);
                let l = loss::ce(&logits, &yc);
                let g = Tensor::run_backward(&[l.sum(Kind::Float)], &[&xg], false, false)
                    .pop()
                    .expect("one input, one gradient");
                let logits = logits.detach().to_kind(Kind::Float);
                // Tallied where this draw is still right (or its logits not finite), as in
                // grad::evaluate: a broken draw's flat loss is no sign of masking.
                let peak = g.reshape([copies as i64 * n, -1]).abs().amax([1], false);
                let counted = logits
                    .argmax(-1, false)
                    .eq_tensor(&yc)
                    .logical_or(&logits.isfinite().all_dim(1, false).logical_not());
                let count =
                    |t: &Tensor| t.logical_and(&counted).sum(Kind::Int64).int64_value(&[]) as u64;
                stats.evaluations += count(&counted);
                stats.zero += count(&peak.eq(0.0));
                stats.non_finite += count(&peak.isfinite().logical_not());
                let l = l.detach().to_kind(Kind::Float).nan_to_num(0.0, 0.0, 0.0);
                let g = g.nan_to_num(0.0, 0.0, 0.0);
                for j in 0..copies as i64 {
                    losses.push(l.narrow(0, j * n, n));
                    grads.push(g.narrow(0, j * n, n));
                }
                draws.push(logits.view([copies as i64, n, -1]));
            }
            let l = Tensor::stack(&losses, 0); // K x N
            keep.offer(
                &adv,
                &Tensor::cat(&draws, 0),
                &l.mean_dim(0, false, Kind::Float),
                &fooled,
                None,
            );
            // Per image, the K losses ranked; the draws at or above the keep-th largest count.
            let threshold = l
                .topk(self.keep(), 0, true, true)
                .0
                .select(0, self.keep() - 1);
            let mask = l.ge_tensor(&threshold.unsqueeze(0)).to_kind(Kind::Float); // K x N
            let g = Tensor::stack(&grads, 0); // K x N x C x H x W
            let chosen = (g * mask.view([k, n, 1, 1, 1])).sum_dim_intlist(0, false, Kind::Float);
            adv = norm.project(&(&adv + norm.direction(&chosen) * self.step_size), x, eps);
        }
        keep.offer_fresh(model, &adv, &|z| loss::ce(z, y), &fooled, None);
        let (best, claimed) = keep.finish(model, &fooled);
        Ok(AttackOutput {
            x_adv: best.detach(),
            claimed,
            grad: stats,
        })
    }
}
