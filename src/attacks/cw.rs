//! Carlini & Wagner L2 (2017): minimise `||x' - x||_2^2 + c * max(z_y - max_{j!=y} z_j, -kappa)`
//! over `x' = (tanh(w) + 1) / 2` (so x' stays in [0,1] without clipping) with Adam, and search
//! the constant c per sample: halve the interval between the smallest c that succeeded and the
//! largest that failed, or multiply c by 10 while nothing has succeeded. Defaults are the
//! paper's (9 search steps, lr 0.01, c starts at 1e-3, early abort when the loss stops falling)
//! except for 1,000 instead of 10,000 Adam steps per search step (`--steps` sets it).
//!
//! C&W is a minimum-norm attack; under an eps budget a sample counts as broken when the
//! smallest adversarial found has norm <= eps. For the others the best candidate projected onto
//! the ball is returned (the runner re-evaluates whatever comes back). On a random model the
//! image returned is chosen among the iterates inside the budget (and that projection) by the
//! selection rule of [`super::select`], and success is claimed on fresh draws.

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

use super::grad::{GradStats, evaluate};
use super::select::{Keeper, Selection, claim_of};
use super::{Attack, AttackOutput, Budget, Norm, loss};
use crate::models::Model;

pub struct CarliniWagner {
    pub budget: Budget,
    /// Adam steps per binary-search step.
    pub steps: usize,
    pub search_steps: usize,
    pub initial_const: f64,
    pub lr: f64,
    /// Confidence margin kappa.
    pub kappa: f64,
    pub eot: usize,
    /// The image returned on a random model.
    pub selection: Selection,
}

impl CarliniWagner {
    pub fn new(budget: Budget, steps: usize, eot: usize) -> Self {
        CarliniWagner {
            budget,
            steps,
            search_steps: 9,
            initial_const: 1e-3,
            lr: 0.01,
            kappa: 0.0,
            eot,
            selection: Selection::default(),
        }
    }
}

/// Per-sample squared L2 distance (N values).
fn sq_dist(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b)
        .square()
        .flatten(1, -1)
        .sum_dim_intlist(1, false, Kind::Float)
}

fn rows(t: &Tensor) -> Tensor {
    t.view([-1, 1, 1, 1])
}

impl Attack for CarliniWagner {
    fn name(&self) -> String {
        "cw".into()
    }
    fn budget(&self) -> Budget {
        self.budget
    }
    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<AttackOutput> {
        if self.budget.norm != Norm::L2 {
            bail!(
                "cw is the L2 attack of Carlini & Wagner; for linf use pgd with `loss` margin (the same objective)"
            );
        }
        tch::manual_seed(seed as i64);
        let n = x.size()[0];
        let dev = x.device();
        let opts = (Kind::Float, dev);
        let mut stats = GradStats::default();
        let mut lower = Tensor::zeros([n], opts);
        let mut upper = Tensor::full([n], 1e10, opts);
        let mut c = Tensor::full([n], self.initial_const, opts);
        let mut best_dist = Tensor::full([n], f64::INFINITY, opts);
        let mut best = x.copy();
        // Start inside the open interval so atanh is finite at saturated pixels.
        let w0 = ((x * 2.0 - 1.0) * (1.0 - 1e-6)).atanh();
        let to_image = |w: &Tensor| (w.tanh() + 1.0) * 0.5;
        let fooled = |z: &Tensor| loss::margin(z, y).gt(self.kappa);
        let mut keep = Keeper::for_model(model, self.selection.for_min_norm(), self.eot, x);
        let eps2 = self.budget.eps * self.budget.eps * (1.0 + 1e-6);
        for _ in 0..self.search_steps {
            let mut w = w0.copy();
            let (mut m, mut v) = (w.zeros_like(), w.zeros_like());
            let mut found = Tensor::zeros([n], (Kind::Bool, dev));
            let mut prev = f64::INFINITY;
            let check_every = (self.steps / 10).max(1);
            for t in 1..=self.steps {
                let xa = to_image(&w);
                let ci = c.shallow_clone();
                let kappa = self.kappa;
                let objective = |z: &Tensor| (-loss::margin(z, y)).clamp_min(-kappa) * &ci;
                let e = evaluate(model, &xa, y, &objective, self.eot, &mut stats);
                let dist = sq_dist(&xa, x);
                if let Some(k) = &mut keep {
                    let k_draws = e.draws.size()[0];
                    let mean = (0..k_draws)
                        .map(|j| loss::margin(&e.draws.get(j), y))
                        .reduce(|a, b| a + b)
                        .expect("at least one draw")
                        / k_draws as f64;
                    k.offer(&xa, &e.draws, &mean, &fooled, Some(&dist.le(eps2)));
                }
                // Success: another class beats y by more than kappa.
                let hit = loss::margin(&e.logits, y).gt(self.kappa);
                let better = hit.logical_and(&dist.lt_tensor(&best_dist));
                best_dist = dist.where_self(&better, &best_dist);
                best = xa.where_self(&rows(&better), &best);
                found = found.logical_or(&hit);
                // d/dx' of the distance is 2 (x' - x); chain both terms through the tanh.
                let gx = e.grad + (&xa - x) * 2.0;
                let g: Tensor = gx * (w.tanh().square().neg() + 1.0) * 0.5;
                m = &m * 0.9 + &g * 0.1;
                v = &v * 0.999 + g.square() * 0.001;
                let mh = &m / (1.0 - 0.9f64.powi(t as i32));
                let vh = &v / (1.0 - 0.999f64.powi(t as i32));
                w -= mh / (vh.sqrt() + 1e-8) * self.lr;
                if t % check_every == 0 {
                    let total = (dist + e.loss).sum(Kind::Float).double_value(&[]);
                    if total > prev * 0.9999 {
                        break;
                    }
                    prev = total;
                }
            }
            let failed = found.logical_not();
            upper = upper.minimum(&c).where_self(&found, &upper);
            lower = lower.maximum(&c).where_self(&failed, &lower);
            let bisect = (&lower + &upper) * 0.5;
            let grow = &c * 10.0;
            c = bisect.where_self(&upper.lt(1e9), &grow);
        }
        let x_adv = self.budget.norm.project(&best, x, self.budget.eps);
        let (x_adv, claimed) = match keep {
            Some(mut k) => {
                k.offer_fresh(model, &x_adv, &|z| loss::margin(z, y), &fooled, None);
                k.finish(model, &fooled)
            }
            None => {
                let hit = tch::no_grad(|| model.logits(&x_adv))
                    .argmax(-1, false)
                    .ne_tensor(y);
                (x_adv, claim_of(&hit))
            }
        };
        Ok(AttackOutput {
            x_adv,
            claimed,
            grad: stats,
        })
    }
}
