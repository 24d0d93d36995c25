//! Square Attack (Andriushchenko et al. 2020), Linf: a score-based random search that needs no
//! gradients, so gradient masking does not stop it. It starts from random vertical stripes at
//! +-eps and, per query, proposes a random square window set to +-eps per channel; a proposal is
//! kept when it lowers the margin z_y - max_{j!=y} z_j. The window's area starts at p_init of the
//! image and shrinks on the paper's schedule (halving at 10, 50, 200, 500, 1000, 2000, 4000, 6000
//! and 8000 of 10,000 rescaled queries).

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

use super::{Attack, AttackOutput, Budget, GradStats, Norm, on_remaining};
use crate::models::Model;

pub struct Square {
    pub budget: Budget,
    pub queries: usize,
    pub p_init: f64,
    pub restarts: usize,
}

/// Fraction of the image a proposal window covers at query `i` of `n`.
pub fn window_fraction(p_init: f64, i: usize, n: usize) -> f64 {
    let it = (i as f64 / n.max(1) as f64 * 10_000.0) as usize;
    let div = match it {
        0..=10 => 1.0,
        11..=50 => 2.0,
        51..=200 => 4.0,
        201..=500 => 8.0,
        501..=1000 => 16.0,
        1001..=2000 => 32.0,
        2001..=4000 => 64.0,
        4001..=6000 => 128.0,
        6001..=8000 => 256.0,
        _ => 512.0,
    };
    p_init / div
}

/// z_y - max_{j != y} z_j: negative exactly when the sample is misclassified.
fn margin(model: &dyn Model, x: &Tensor, y: &Tensor) -> Tensor {
    -super::loss::margin(&tch::no_grad(|| model.logits(x)), y)
}

impl Square {
    fn single_run(&self, model: &dyn Model, x: &Tensor, y: &Tensor) -> (Tensor, Tensor) {
        let eps = self.budget.eps;
        let (n, c, h, w) = x.size4().expect("images are N x C x H x W");
        let dev = x.device();
        let signs = |shape: &[i64]| {
            Tensor::rand(shape, (Kind::Float, dev))
                .lt(0.5)
                .to_kind(Kind::Float)
                * 2.0
                - 1.0
        };
        let mut best = (x + signs(&[n, c, 1, w]) * eps).clamp(0.0, 1.0);
        let mut best_margin = margin(model, &best, y);
        let rows = Tensor::arange(h, (Kind::Int64, dev)).view([1, 1, h, 1]);
        let cols = Tensor::arange(w, (Kind::Int64, dev)).view([1, 1, 1, w]);
        for i in 0..self.queries {
            let active = best_margin.gt(0.0).nonzero().squeeze_dim(1);
            let k = active.size()[0];
            if k == 0 {
                break;
            }
            let p = window_fraction(self.p_init, i, self.queries);
            let side = ((p * (h * w) as f64).sqrt().round() as i64).clamp(1, h.min(w) - 1);
            let top = Tensor::randint(h - side + 1, [k, 1, 1, 1], (Kind::Int64, dev));
            let left = Tensor::randint(w - side + 1, [k, 1, 1, 1], (Kind::Int64, dev));
            let window = rows
                .ge_tensor(&top)
                .logical_and(&rows.lt_tensor(&(&top + side)))
                .logical_and(&cols.ge_tensor(&left))
                .logical_and(&cols.lt_tensor(&(&left + side)));
            let xa = x.index_select(0, &active);
            let ba = best.index_select(0, &active);
            let proposal = (signs(&[k, c, 1, 1]) * eps).where_self(&window, &(&ba - &xa));
            let candidate = (&xa + proposal).clamp(0.0, 1.0);
            let m = margin(model, &candidate, &y.index_select(0, &active));
            let old = best_margin.index_select(0, &active);
            let better = m.lt_tensor(&old);
            let kept = candidate.where_self(&better.view([-1, 1, 1, 1]), &ba);
            best = best.index_copy(0, &active, &kept);
            best_margin = best_margin.index_copy(0, &active, &m.where_self(&better, &old));
        }
        let success = best_margin.lt(0.0);
        (best, success)
    }
}

impl Attack for Square {
    fn name(&self) -> String {
        "square".into()
    }
    fn budget(&self) -> Budget {
        self.budget
    }
    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<AttackOutput> {
        if self.budget.norm != Norm::Linf {
            bail!("square: only the linf version is implemented yet (l2 is not)");
        }
        let (h, w) = (x.size()[2], x.size()[3]);
        if h < 2 || w < 2 {
            bail!("square: images must be at least 2x2 pixels");
        }
        let (x_adv, _) = on_remaining(x, y, self.restarts, seed, |_, _, xs, ys| {
            self.single_run(model, xs, ys)
        });
        Ok(AttackOutput {
            x_adv,
            grad: GradStats::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_schedule_halves_at_the_papers_points() {
        assert_eq!(window_fraction(0.8, 0, 5000), 0.8);
        // Query 5 of 5,000 is 10 of 10,000: still the first stage; 6 is 12: halved.
        assert_eq!(window_fraction(0.8, 5, 5000), 0.8);
        assert_eq!(window_fraction(0.8, 6, 5000), 0.4);
        assert_eq!(window_fraction(0.8, 4999, 5000), 0.8 / 512.0);
    }
}
