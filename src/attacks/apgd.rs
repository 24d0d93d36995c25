//! APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
//! diverse parameter-free attacks"): PGD with momentum 0.75 and a step size that starts at
//! 2*eps and is halved at checkpoints when progress stalls, restarting from the best point.
//!
//! Checkpoints follow the paper: the first after 22 % of the iterations, then intervals that
//! shrink by 3 % of the budget down to 6 %. At a checkpoint a sample's step is halved if
//! (1) the loss increased in at most rho = 75 % of the steps since the last checkpoint, or
//! (2) the step was not halved at the last checkpoint and the best loss has not improved.
//! Losses: CE, DLR, and targeted DLR over the top `targets` non-true classes (APGD-T). As in
//! AutoAttack, success means misclassification, also for the targeted variant.

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

use super::grad::{GradStats, evaluate};
use super::{Attack, AttackOutput, Budget, loss, on_remaining};
use crate::models::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApgdLoss {
    Ce,
    Dlr,
    DlrTargeted { targets: usize },
}

pub struct Apgd {
    pub budget: Budget,
    pub steps: usize,
    /// Untargeted: random restarts. Targeted: runs per target class.
    pub restarts: usize,
    pub loss: ApgdLoss,
    pub eot: usize,
    pub rho: f64,
    pub momentum: f64,
}

/// Iteration counts between checkpoints for a budget of `n` iterations.
pub fn checkpoint_intervals(n: usize) -> Vec<usize> {
    let first = ((0.22 * n as f64) as usize).max(1);
    let decrease = ((0.03 * n as f64) as usize).max(1);
    let min = ((0.06 * n as f64) as usize).max(1);
    let mut out = Vec::new();
    let (mut k, mut at) = (first, 0);
    while at + k <= n {
        out.push(k);
        at += k;
        k = k.saturating_sub(decrease).max(min);
    }
    out
}

fn rows(mask: &Tensor) -> Tensor {
    mask.view([-1, 1, 1, 1])
}

impl Apgd {
    fn single_run(
        &self,
        model: &dyn Model,
        x: &Tensor,
        y: &Tensor,
        target: Option<&Tensor>,
        stats: &mut GradStats,
    ) -> (Tensor, Tensor) {
        let Budget { norm, eps } = self.budget;
        let objective = |z: &Tensor| match (self.loss, target) {
            (ApgdLoss::Ce, _) => loss::ce(z, y),
            (ApgdLoss::Dlr, _) => loss::dlr(z, y),
            (ApgdLoss::DlrTargeted { .. }, Some(t)) => loss::dlr_targeted(z, y, t),
            (ApgdLoss::DlrTargeted { .. }, None) => unreachable!("targets chosen by run()"),
        };
        let n = x.size()[0];
        let mut x_adv = norm.random_start(x, eps);
        let e = evaluate(model, &x_adv, &objective, self.eot, stats);
        let mut grad = e.grad;
        let mut success = e.logits.argmax(-1, false).ne_tensor(y);
        let mut x_found = x_adv.copy();
        let mut x_best = x_adv.copy();
        let mut grad_best = grad.copy();
        let mut loss_best = e.loss.copy();
        let mut history = vec![e.loss];
        let mut step = Tensor::full([n, 1, 1, 1], 2.0 * eps, (Kind::Float, x.device()));
        let mut x_prev = x_adv.copy();

        let intervals = checkpoint_intervals(self.steps);
        let mut next_check = intervals.first().copied().unwrap_or(usize::MAX);
        let mut checks_done = 0;
        let mut since_check = 0;
        let mut loss_best_at_check = loss_best.copy();
        let mut halved_at_check = Tensor::zeros([n], (Kind::Bool, x.device()));
        let a = self.momentum;
        for i in 0..self.steps {
            let z = norm.project(&(&x_adv + norm.direction(&grad) * &step), x, eps);
            let next = if i == 0 {
                z
            } else {
                let moved = &x_adv + (&z - &x_adv) * a + (&x_adv - &x_prev) * (1.0 - a);
                norm.project(&moved, x, eps)
            };
            x_prev = std::mem::replace(&mut x_adv, next);
            let e = evaluate(model, &x_adv, &objective, self.eot, stats);
            let hit = e.logits.argmax(-1, false).ne_tensor(y);
            x_found = x_adv.where_self(&rows(&hit), &x_found);
            success = success.logical_or(&hit);
            let improved = e.loss.gt_tensor(&loss_best);
            x_best = x_adv.where_self(&rows(&improved), &x_best);
            grad_best = e.grad.where_self(&rows(&improved), &grad_best);
            loss_best = e.loss.where_self(&improved, &loss_best);
            grad = e.grad;
            history.push(e.loss);
            since_check += 1;
            if since_check == next_check {
                let len = history.len();
                let mut increases = Tensor::zeros([n], (Kind::Float, x.device()));
                for j in 0..since_check {
                    increases += history[len - 1 - j]
                        .gt_tensor(&history[len - 2 - j])
                        .to_kind(Kind::Float);
                }
                let oscillating = increases.le(since_check as f64 * self.rho);
                let stalled = halved_at_check
                    .logical_not()
                    .logical_and(&loss_best_at_check.ge_tensor(&loss_best));
                let halve = oscillating.logical_or(&stalled);
                step = (&step * 0.5).where_self(&rows(&halve), &step);
                x_adv = x_best.where_self(&rows(&halve), &x_adv);
                x_prev = x_best.where_self(&rows(&halve), &x_prev);
                grad = grad_best.where_self(&rows(&halve), &grad);
                halved_at_check = halve;
                loss_best_at_check = loss_best.copy();
                since_check = 0;
                checks_done += 1;
                next_check = intervals.get(checks_done).copied().unwrap_or(usize::MAX);
            }
        }
        (x_found.where_self(&rows(&success), &x_best), success)
    }
}

impl Attack for Apgd {
    fn name(&self) -> String {
        match self.loss {
            ApgdLoss::Ce => "apgd-ce".into(),
            ApgdLoss::Dlr => "apgd-dlr".into(),
            ApgdLoss::DlrTargeted { .. } => "apgd-t".into(),
        }
    }
    fn budget(&self) -> Budget {
        self.budget
    }
    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<AttackOutput> {
        let classes = model.num_classes();
        let mut stats = GradStats::default();
        let (x_adv, _) = match self.loss {
            ApgdLoss::DlrTargeted { targets } => {
                if classes < 4 {
                    bail!(
                        "apgd-t uses the targeted DLR loss, which needs at least 4 classes (the model has {classes})"
                    );
                }
                let targets = targets.min(classes - 1);
                // Targets: the 2nd, 3rd, ... highest clean logits.
                let order = tch::no_grad(|| model.logits(x)).argsort(1, true);
                on_remaining(x, y, targets * self.restarts, seed, |r, idx, xs, ys| {
                    let t = order
                        .index_select(0, idx)
                        .select(1, (r / self.restarts + 1) as i64);
                    self.single_run(model, xs, ys, Some(&t), &mut stats)
                })
            }
            other => {
                if other == ApgdLoss::Dlr && classes < 3 {
                    bail!("apgd-dlr needs at least 3 classes (the model has {classes})");
                }
                on_remaining(x, y, self.restarts, seed, |_, _, xs, ys| {
                    self.single_run(model, xs, ys, None, &mut stats)
                })
            }
        };
        Ok(AttackOutput { x_adv, grad: stats })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_follow_the_paper() {
        // n = 100: 22, then 19, 16, 13, 10, 7, 6, 6 (sum 99).
        assert_eq!(checkpoint_intervals(100), vec![22, 19, 16, 13, 10, 7, 6, 6]);
        assert!(checkpoint_intervals(100).iter().sum::<usize>() <= 100);
        assert_eq!(checkpoint_intervals(1), vec![1]);
    }
}
