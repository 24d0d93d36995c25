//! APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
//! diverse parameter-free attacks"): PGD with momentum 0.75 and a step size that starts at
//! 2*eps and is halved at checkpoints when progress stalls, restarting from the best point.
//!
//! Checkpoints follow the paper: the first after 22 % of the iterations, then intervals that
//! shrink by 3 % of the budget down to 6 %. At a checkpoint a sample's step is halved if
//! (1) the loss increased in at most rho = 75 % of the steps since the last checkpoint, or
//! (2) the step was not halved at the last checkpoint and the best loss has not improved.
//! Losses: CE, DLR, the C&W margin, and targeted DLR over the top `targets` non-true classes (APGD-T). As in
//! AutoAttack, success means misclassification, also for the targeted variant.
//!
//! L1 (Croce & Hein 2021, "Mind the box"): no momentum; the step moves the top fraction of
//! coordinates by |gradient| (20 % at first, then 1/1.5 of the current support) and is
//! projected onto the L1 ball intersected with the box; the step starts at eps and at
//! checkpoints every 4 % of the iterations goes back to eps (restarting from the best point)
//! where the support shrank by 5 %, otherwise divides by 1.5 (never below eps/10). With
//! `large_eps` (AutoAttack's L1 standard version) the iterations run at 3 eps, 2 eps, then eps
//! (30/30/40 %), each stage starting from the previous best point; only the last stage counts.
//!
//! On a random model the image returned follows the selection rule of [`super::select`] over
//! every iterate (the highest-loss point still drives the restarts), and success is claimed on
//! fresh draws.

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

use super::grad::{GradStats, evaluate};
use super::norm::sparse_direction;
use super::select::{Keeper, Selection, claim_of, reclaim};
use super::{Attack, AttackOutput, Budget, Norm, loss, on_remaining};
use crate::models::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApgdLoss {
    Ce,
    Dlr,
    /// The C&W margin max_{j!=y} z_j - z_y (Carlini & Wagner's f6), unscaled.
    Margin,
    DlrTargeted {
        targets: usize,
    },
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
    /// L1 only: run at 3 eps, 2 eps, then eps.
    pub large_eps: bool,
    /// The image returned on a random model.
    pub selection: Selection,
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

/// Per-sample number of non-zero entries.
fn l0(t: &Tensor) -> Tensor {
    t.flatten(1, -1)
        .ne(0.0)
        .sum_dim_intlist(1, false, Kind::Float)
}

/// One APGD run's outcome.
struct RunOutput {
    /// Deterministic model: misclassified points where found, else the highest-loss point;
    /// random model: the keeper's choice.
    images: Tensor,
    claimed: Tensor,
    /// The highest-loss point (the next stage's start under `large_eps`).
    best: Tensor,
}

impl Apgd {
    fn run_once(
        &self,
        model: &dyn Model,
        x: &Tensor,
        y: &Tensor,
        target: Option<&Tensor>,
        stats: &mut GradStats,
    ) -> (Tensor, Tensor) {
        let (norm, eps) = (self.budget.norm, self.budget.eps);
        if !(self.large_eps && norm == Norm::L1) {
            let out = self.single_run(model, x, y, target, eps, self.steps, None, stats);
            return (out.images, out.claimed);
        }
        let first = (0.3 * self.steps as f64).ceil() as usize;
        let stages = [
            (3.0 * eps, first),
            (2.0 * eps, first),
            (eps, self.steps.saturating_sub(2 * first).max(1)),
        ];
        let mut start = norm.random_start(x, stages[0].0);
        let mut last = None;
        for (e, steps) in stages {
            let init = norm.project(&start, x, e);
            let out = self.single_run(model, x, y, target, e, steps, Some(init), stats);
            start = out.best.shallow_clone();
            last = Some(out);
        }
        let out = last.expect("three stages");
        (out.images, out.claimed)
    }

    /// The loss APGD ascends (the target chosen by `run` for the targeted DLR loss).
    fn objective(&self, z: &Tensor, y: &Tensor, target: Option<&Tensor>) -> Tensor {
        match (self.loss, target) {
            (ApgdLoss::Ce, _) => loss::ce(z, y),
            (ApgdLoss::Dlr, _) => loss::dlr(z, y),
            (ApgdLoss::Margin, _) => loss::margin(z, y),
            (ApgdLoss::DlrTargeted { .. }, Some(t)) => loss::dlr_targeted(z, y, t),
            (ApgdLoss::DlrTargeted { .. }, None) => unreachable!("targets chosen by run()"),
        }
    }

    /// At a checkpoint (Linf and L2), the points whose step halves: the loss rose in at most a
    /// share rho of the steps since the last checkpoint, or the step was not halved there and
    /// the best loss has not improved since (`best` = (at the last checkpoint, now)).
    fn to_halve(
        &self,
        history: &[Tensor],
        since_check: usize,
        halved_at_check: &Tensor,
        (best_at_check, best): (&Tensor, &Tensor),
    ) -> Tensor {
        let len = history.len();
        let mut increases = Tensor::zeros_like(best);
        for j in 0..since_check {
            increases += history[len - 1 - j]
                .gt_tensor(&history[len - 2 - j])
                .to_kind(Kind::Float);
        }
        let oscillating = increases.le(since_check as f64 * self.rho);
        let stalled = halved_at_check
            .logical_not()
            .logical_and(&best_at_check.ge_tensor(best));
        oscillating.logical_or(&stalled)
    }

    #[allow(clippy::too_many_arguments)]
    fn single_run(
        &self,
        model: &dyn Model,
        x: &Tensor,
        y: &Tensor,
        target: Option<&Tensor>,
        eps: f64,
        steps: usize,
        init: Option<Tensor>,
        stats: &mut GradStats,
    ) -> RunOutput {
        let norm = self.budget.norm;
        let l1 = norm == Norm::L1;
        let objective = |z: &Tensor| self.objective(z, y, target);
        let n = x.size()[0];
        let dims = x.size()[1..].iter().product::<i64>() as f64;
        let opts = (Kind::Float, x.device());
        let (mut x_adv, mut support, mut topk) = start(norm, x, eps, init);
        let fooled = |z: &Tensor| z.argmax(-1, false).ne_tensor(y);
        let mut keep = Keeper::for_model(model, self.selection, self.eot, &x_adv);
        let e = evaluate(model, &x_adv, y, &objective, self.eot, stats);
        if let Some(k) = &mut keep {
            k.offer(&x_adv, &e.draws, &e.loss, &fooled, None);
        }
        let mut grad = e.grad;
        let mut success = e.logits.argmax(-1, false).ne_tensor(y);
        let mut x_found = x_adv.copy();
        let mut x_best = x_adv.copy();
        let mut grad_best = grad.copy();
        let mut loss_best = e.loss.copy();
        let mut history = vec![e.loss];
        let step_max = if l1 { eps } else { 2.0 * eps };
        let mut step = Tensor::full([n, 1, 1, 1], step_max, opts);
        let mut x_prev = x_adv.copy();
        let intervals = if l1 {
            vec![((0.04 * steps as f64) as usize).max(1); steps]
        } else {
            checkpoint_intervals(steps)
        };
        let mut next_check = intervals.first().copied().unwrap_or(usize::MAX);
        let mut checks_done = 0;
        let mut since_check = 0;
        let mut loss_best_at_check = loss_best.copy();
        let mut halved_at_check = Tensor::zeros([n], (Kind::Bool, x.device()));
        let a = self.momentum;
        for i in 0..steps {
            let next = if l1 {
                let moved = &x_adv + sparse_direction(&grad, &topk) * &step;
                norm.project(&moved, x, eps)
            } else {
                let z = norm.project(&(&x_adv + norm.direction(&grad) * &step), x, eps);
                if i == 0 {
                    z
                } else {
                    let moved = &x_adv + (&z - &x_adv) * a + (&x_adv - &x_prev) * (1.0 - a);
                    norm.project(&moved, x, eps)
                }
            };
            x_prev = std::mem::replace(&mut x_adv, next);
            let e = evaluate(model, &x_adv, y, &objective, self.eot, stats);
            if let Some(k) = &mut keep {
                k.offer(&x_adv, &e.draws, &e.loss, &fooled, None);
            }
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
                let restart = if l1 {
                    // Restart from the best point with a full step where the support shrank.
                    let now = l0(&(&x_best - x));
                    let shrank = (&now / &support).lt(0.95);
                    topk = &now / dims / 1.5;
                    step = Tensor::full_like(&step, eps)
                        .where_self(&rows(&shrank), &(&step / 1.5))
                        .clamp(eps / 10.0, eps);
                    support = now;
                    shrank
                } else {
                    let halve = self.to_halve(
                        &history,
                        since_check,
                        &halved_at_check,
                        (&loss_best_at_check, &loss_best),
                    );
                    step = (&step * 0.5).where_self(&rows(&halve), &step);
                    halved_at_check = halve.shallow_clone();
                    loss_best_at_check = loss_best.copy();
                    halve
                };
                x_adv = x_best.where_self(&rows(&restart), &x_adv);
                x_prev = x_best.where_self(&rows(&restart), &x_prev);
                grad = grad_best.where_self(&rows(&restart), &grad);
                since_check = 0;
                checks_done += 1;
                next_check = intervals.get(checks_done).copied().unwrap_or(usize::MAX);
            }
        }
        let (images, claimed) = match keep {
            Some(k) => k.finish(model, &fooled),
            None => (
                x_found.where_self(&rows(&success), &x_best),
                claim_of(&success),
            ),
        };
        RunOutput {
            images,
            claimed,
            best: x_best,
        }
    }
}

/// The first iterate, and for L1 the support at the last check and the fraction of coordinates
/// a step moves (from a given start, its support; from a random one, all coordinates and 20 %).
fn start(norm: Norm, x: &Tensor, eps: f64, init: Option<Tensor>) -> (Tensor, Tensor, Tensor) {
    let dims = x.size()[1..].iter().product::<i64>() as f64;
    match init {
        Some(p) => {
            let support = l0(&(&p - x));
            let topk = &support / dims / 1.5;
            (p, support, topk)
        }
        None => {
            let (n, opts) = (x.size()[0], (Kind::Float, x.device()));
            (
                norm.random_start(x, eps),
                Tensor::full([n], dims, opts),
                Tensor::full([n], 0.2, opts),
            )
        }
    }
}

impl Attack for Apgd {
    fn name(&self) -> String {
        match self.loss {
            ApgdLoss::Ce => "apgd-ce".into(),
            ApgdLoss::Dlr => "apgd-dlr".into(),
            ApgdLoss::Margin => "apgd-cw".into(),
            ApgdLoss::DlrTargeted { .. } => "apgd-t".into(),
        }
    }
    fn budget(&self) -> Budget {
        self.budget
    }
    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<AttackOutput> {
        let classes = model.num_classes();
        let mut stats = GradStats::default();
        let runs = match self.loss {
            ApgdLoss::DlrTargeted { targets } => targets * self.restarts,
            _ => self.restarts,
        };
        let (x_adv, claimed) = match self.loss {
            ApgdLoss::DlrTargeted { targets } => {
                if classes < 4 {
                    bail!(
                        "apgd-t uses the targeted DLR loss, which needs at least 4 classes (the model has {classes})"
                    );
                }
                if targets > classes - 1 {
                    bail!(
                        "targets = {targets}: the model has {classes} classes, so at most {} target classes",
                        classes - 1
                    );
                }
                let order = super::target_order(model, x, y);
                on_remaining(x, y, targets * self.restarts, seed, |r, idx, xs, ys| {
                    let t = order
                        .index_select(0, idx)
                        .select(1, (r / self.restarts) as i64);
                    self.run_once(model, xs, ys, Some(&t), &mut stats)
                })
            }
            other => {
                if other == ApgdLoss::Dlr && classes < 3 {
                    bail!("apgd-dlr needs at least 3 classes (the model has {classes})");
                }
                on_remaining(x, y, self.restarts, seed, |_, _, xs, ys| {
                    self.run_once(model, xs, ys, None, &mut stats)
                })
            }
        };
        let claimed = if runs > 1 {
            let fooled = |z: &Tensor| z.argmax(-1, false).ne_tensor(y);
            reclaim(model, self.selection, self.eot, &x_adv, claimed, &fooled)
        } else {
            claimed
        };
        Ok(AttackOutput {
            x_adv,
            claimed,
            grad: stats,
        })
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
