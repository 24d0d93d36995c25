//! Square Attack (Andriushchenko et al. 2020): a score-based random search that needs no
//! gradients, so gradient masking does not stop it. A proposal changes the perturbation in a
//! random square window and is kept when it lowers the margin z_y - max_{j!=y} z_j. The
//! window's area starts at p_init of the image and halves at queries 10, 50, 200, 500, 1000,
//! 2000, 4000, 6000 and 8000 (AutoAttack's schedule; `rescale` maps the budget onto 10,000
//! queries as the original Square code and torchattacks do).
//!
//! - Linf: start from random vertical stripes at +-eps; a proposal sets the window to +-eps
//!   per channel.
//! - L2: start from a tiling of pseudo-Gaussian blocks (concentric squares weighted 1/(k+1)^2,
//!   opposite signs in the two halves) scaled to norm eps; a proposal moves the mass of a second
//!   window into the first, on top of a fresh random block, and rescales to norm eps.
//!
//! Window positions are drawn per sample (AutoAttack draws one position for the whole batch).
//!
//! On a deterministic model a sample stops being queried once it is misclassified. On a random
//! model one misclassified query proves nothing, so every sample spends the whole budget, and
//! success is claimed on fresh draws of the image kept ([`super::select`]).

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

use super::select::{Keeper, Selection, claim_of, reclaim};
use super::{Attack, AttackOutput, Budget, GradStats, Norm, on_remaining};
use crate::models::Model;

pub struct Square {
    pub budget: Budget,
    pub queries: usize,
    pub p_init: f64,
    pub restarts: usize,
    /// Stretch the window schedule over the query budget as if it were 10,000 queries.
    pub rescale: bool,
    /// Fresh draws that judge the image kept, on a random model.
    pub eot: usize,
    pub selection: Selection,
}

/// Fraction of the image a proposal window covers at query `i` of `n`.
pub fn window_fraction(p_init: f64, i: usize, n: usize, rescale: bool) -> f64 {
    let it = if rescale {
        (i as f64 / n.max(1) as f64 * 10_000.0) as usize
    } else {
        i
    };
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

/// Pixel mask N x 1 x H x W of the side x side windows at (top, left) (each N x 1 x 1 x 1).
fn window(top: &Tensor, left: &Tensor, side: i64, h: i64, w: i64) -> Tensor {
    let dev = top.device();
    let rows = Tensor::arange(h, (Kind::Int64, dev)).view([1, 1, h, 1]);
    let cols = Tensor::arange(w, (Kind::Int64, dev)).view([1, 1, 1, w]);
    rows.ge_tensor(top)
        .logical_and(&rows.lt_tensor(&(top + side)))
        .logical_and(&cols.ge_tensor(left))
        .logical_and(&cols.lt_tensor(&(left + side)))
}

/// Random top-left corners for `k` windows of side `side` in an h x w image.
fn corners(k: i64, side: i64, h: i64, w: i64, dev: tch::Device) -> (Tensor, Tensor) {
    let top = Tensor::randint(h - side + 1, [k, 1, 1, 1], (Kind::Int64, dev));
    let left = Tensor::randint(w - side + 1, [k, 1, 1, 1], (Kind::Int64, dev));
    (top, left)
}

/// Keeps each active sample's candidate where it lowers the margin (one query each);
/// `current` holds the active samples' best images so far.
fn accept(
    model: &dyn Model,
    y: &Tensor,
    active: &Tensor,
    candidate: &Tensor,
    current: &Tensor,
    best: &mut Tensor,
    best_margin: &mut Tensor,
) {
    let m = margin(model, candidate, &y.index_select(0, active));
    let old = best_margin.index_select(0, active);
    let better = m.lt_tensor(&old);
    let kept = candidate.where_self(&better.view([-1, 1, 1, 1]), current);
    *best = best.index_copy(0, active, &kept);
    *best_margin = best_margin.index_copy(0, active, &m.where_self(&better, &old));
}

/// Random signs, +-1.
fn signs(shape: &[i64], dev: tch::Device) -> Tensor {
    Tensor::rand(shape, (Kind::Float, dev))
        .lt(0.5)
        .to_kind(Kind::Float)
        * 2.0
        - 1.0
}

/// An a x b block of concentric square rings around its centre, ring k weighted by the sum of
/// 1/(j+1)^2 for j >= k (a discrete, peaked bump), with unit L2 norm; for L1, 1/(j+1)^4 and
/// unit L1 norm.
fn rings(a: i64, b: i64, norm: Norm) -> Vec<f64> {
    let (ca, cb) = (a / 2, b / 2);
    let k = (a / 2 + 1).max(b / 2 + 1);
    // tail[m] = sum over j in m..k of 1 / (j + 1)^2.
    let mut tail = vec![0.0; k as usize + 1];
    for j in (0..k).rev() {
        let power = if norm == Norm::L1 { 4 } else { 2 };
        tail[j as usize] = tail[j as usize + 1] + 1.0 / ((j + 1) as f64).powi(power);
    }
    let v: Vec<f64> = (0..a)
        .flat_map(|i| (0..b).map(move |j| (i, j)))
        .map(|(i, j)| tail[(i - ca).abs().max((j - cb).abs()) as usize])
        .collect();
    normalised(v, norm)
}

fn normalised(mut v: Vec<f64>, norm: Norm) -> Vec<f64> {
    let size = match norm {
        Norm::L1 => v.iter().map(|x| x.abs()).sum::<f64>(),
        _ => v.iter().map(|x| x * x).sum::<f64>().sqrt(),
    };
    v.iter_mut().for_each(|x| *x /= size.max(1e-12));
    v
}

/// The s x s proposal block of Square-L2/L1: rings in the top half, negated rings in the bottom
/// half, unit norm, transposed with probability 1/2.
fn pseudo_gaussian(s: i64, norm: Norm, dev: tch::Device) -> Tensor {
    let half = s / 2;
    let mut v = rings(half, s, norm);
    v.extend(rings(s - half, s, norm).into_iter().map(|x| -x));
    let v = normalised(v, norm);
    let t = Tensor::from_slice(&v.iter().map(|x| *x as f32).collect::<Vec<_>>())
        .view([s, s])
        .to_device(dev);
    if Tensor::rand([1], (Kind::Float, tch::Device::Cpu)).double_value(&[0]) < 0.5 {
        t.tr().contiguous()
    } else {
        t
    }
}

/// Per-sample (or per sample and channel) L2 or L1 norm, shaped for broadcasting.
fn size(t: &Tensor, norm: Norm, per_channel: bool) -> Tensor {
    let dims: &[i64] = if per_channel { &[2, 3] } else { &[1, 2, 3] };
    match norm {
        Norm::L1 => t.abs().sum_dim_intlist(dims, true, Kind::Float),
        _ => t.square().sum_dim_intlist(dims, true, Kind::Float).sqrt(),
    }
}

impl Square {
    /// One run: (images, claims).
    fn single_run(&self, model: &dyn Model, x: &Tensor, y: &Tensor) -> (Tensor, Tensor) {
        let keep = Keeper::for_model(model, self.selection, self.eot, x);
        let early_exit = keep.is_none();
        let (best, success) = match self.budget.norm {
            Norm::Linf => self.run_linf(model, x, y, early_exit),
            norm => self.run_lp(model, x, y, norm, early_exit),
        };
        match keep {
            Some(mut k) => {
                let fooled = |z: &Tensor| z.argmax(-1, false).ne_tensor(y);
                k.offer_fresh(model, &best, &|z| super::loss::margin(z, y), &fooled, None);
                k.finish(model, &fooled)
            }
            None => (best, claim_of(&success)),
        }
    }

    /// The samples still to query: those not yet misclassified, or all of them.
    fn active(best_margin: &Tensor, early_exit: bool) -> Tensor {
        if early_exit {
            best_margin.gt(0.0).nonzero().squeeze_dim(1)
        } else {
            Tensor::arange(best_margin.size()[0], (Kind::Int64, best_margin.device()))
        }
    }

    /// L2 and L1. L1 differs in the block (1/(k+1)^4 rings), in how window masses add (L1
    /// norms add, squared L2 norms add) and in mapping to the budget: L2 rescales to norm eps
    /// and clips to the box, L1 projects onto the L1 ball and box (slightly inside, as
    /// AutoAttack does).
    fn run_lp(
        &self,
        model: &dyn Model,
        x: &Tensor,
        y: &Tensor,
        norm: Norm,
        early_exit: bool,
    ) -> (Tensor, Tensor) {
        let eps = self.budget.eps;
        let (n, c, h, w) = x.size4().expect("images are N x C x H x W");
        let dev = x.device();
        let l2 = |t: &Tensor, per_channel: bool| size(t, norm, per_channel);
        let to_ball = |x: &Tensor, delta: &Tensor| match norm {
            Norm::L1 => x + super::norm::l1_box_projection(x, delta, eps * (1.0 - 1e-6)),
            _ => (x + delta * eps / (l2(delta, false) + 1e-12)).clamp(0.0, 1.0),
        };
        // Start: pseudo-Gaussian blocks of side h/5 tiling the image, random sign per channel.
        let s0 = (h / 5).max(1);
        let offset = (h - 5 * s0) / 2;
        let delta0 = Tensor::zeros([n, c, h, w], (Kind::Float, dev));
        for i in 0..h / s0 {
            for j in 0..w / s0 {
                let (top, left) = (offset + i * s0, offset + j * s0);
                let (hs, ws) = (s0.min(h - top), s0.min(w - left));
                let block = pseudo_gaussian(s0, norm, dev)
                    .narrow(0, 0, hs)
                    .narrow(1, 0, ws);
                let mut view = delta0.narrow(2, top, hs).narrow(3, left, ws);
                view += block.view([1, 1, hs, ws]) * signs(&[n, c, 1, 1], dev);
            }
        }
        let mut best = to_ball(x, &delta0);
        let mut best_margin = margin(model, &best, y);
        for i in 0..self.queries {
            let active = Self::active(&best_margin, early_exit);
            let k = active.size()[0];
            if k == 0 {
                break;
            }
            let p = window_fraction(self.p_init, i, self.queries, self.rescale);
            let mut s = ((p * (h * w) as f64).sqrt().round() as i64).max(3);
            if s % 2 == 0 {
                s += 1;
            }
            let s = s.min(h.min(w));
            let (t1, l1) = corners(k, s, h, w, dev);
            let (t2, l2w) = corners(k, s, h, w, dev);
            let w1 = window(&t1, &l1, s, h, w).to_kind(Kind::Float);
            let w2 = window(&t2, &l2w, s, h, w).to_kind(Kind::Float);
            let union = w1.maximum(&w2);
            let xa = x.index_select(0, &active);
            let ba = best.index_select(0, &active);
            let delta = &ba - &xa;
            // The new block at window 1, per sample.
            let eta = pseudo_gaussian(s, norm, dev).reshape([-1]);
            let rows = Tensor::arange(h, (Kind::Int64, dev)).view([1, 1, h, 1]);
            let cols = Tensor::arange(w, (Kind::Int64, dev)).view([1, 1, 1, w]);
            let idx = (&rows - &t1).clamp(0, s - 1) * s + (&cols - &l1).clamp(0, s - 1);
            let block = eta.take(&idx) * &w1;
            let in_w1 = &delta * &w1;
            let fresh = block * signs(&[k, c, 1, 1], dev) + &in_w1 / (l2(&in_w1, true) + 1e-12);
            let fresh = &fresh * &w1;
            // Window 1 takes window 2's mass (and any budget the box clipping left unused).
            let (total, in_windows) = (l2(&delta, false), l2(&(&delta * &union), true));
            let mass = match norm {
                Norm::L1 => ((eps - total).clamp_min(0.0) / c as f64 + in_windows) * c as f64,
                _ => ((eps * eps - total.square()).clamp_min(0.0) / c as f64 + in_windows.square())
                    .sqrt(),
            };
            let fresh = &fresh / (l2(&fresh, true) + 1e-12) * mass;
            let proposal = &delta * (union.neg() + 1.0) + fresh;
            let candidate = to_ball(&xa, &proposal);
            accept(
                model,
                y,
                &active,
                &candidate,
                &ba,
                &mut best,
                &mut best_margin,
            );
        }
        let success = best_margin.lt(0.0);
        (best, success)
    }

    fn run_linf(
        &self,
        model: &dyn Model,
        x: &Tensor,
        y: &Tensor,
        early_exit: bool,
    ) -> (Tensor, Tensor) {
        let eps = self.budget.eps;
        let (n, c, h, w) = x.size4().expect("images are N x C x H x W");
        let dev = x.device();
        let mut best = (x + signs(&[n, c, 1, w], dev) * eps).clamp(0.0, 1.0);
        let mut best_margin = margin(model, &best, y);
        for i in 0..self.queries {
            let active = Self::active(&best_margin, early_exit);
            let k = active.size()[0];
            if k == 0 {
                break;
            }
            let p = window_fraction(self.p_init, i, self.queries, self.rescale);
            let side = ((p * (h * w) as f64).sqrt().round() as i64).clamp(1, h.min(w) - 1);
            let (top, left) = corners(k, side, h, w, dev);
            let window = window(&top, &left, side, h, w);
            let xa = x.index_select(0, &active);
            let ba = best.index_select(0, &active);
            let proposal = (signs(&[k, c, 1, 1], dev) * eps).where_self(&window, &(&ba - &xa));
            let candidate = (&xa + proposal).clamp(0.0, 1.0);
            accept(
                model,
                y,
                &active,
                &candidate,
                &ba,
                &mut best,
                &mut best_margin,
            );
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
        let (h, w) = (x.size()[2], x.size()[3]);
        if h < 2 || w < 2 {
            bail!("square: images must be at least 2x2 pixels");
        }
        let (x_adv, mut claimed) = on_remaining(x, y, self.restarts, seed, |_, _, xs, ys| {
            self.single_run(model, xs, ys)
        });
        if self.restarts > 1 {
            let fooled = |z: &Tensor| z.argmax(-1, false).ne_tensor(y);
            claimed = reclaim(model, self.selection, self.eot, &x_adv, claimed, &fooled);
        }
        Ok(AttackOutput {
            x_adv,
            claimed,
            grad: GradStats::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_schedule_halves_at_the_papers_points() {
        assert_eq!(window_fraction(0.8, 0, 5000, true), 0.8);
        // Rescaled: query 5 of 5,000 is 10 of 10,000: still the first stage; 6 is 12: halved.
        assert_eq!(window_fraction(0.8, 5, 5000, true), 0.8);
        assert_eq!(window_fraction(0.8, 6, 5000, true), 0.4);
        assert_eq!(window_fraction(0.8, 4999, 5000, true), 0.8 / 512.0);
        // AutoAttack's: the query count itself; 5,000 queries end at p_init / 128.
        assert_eq!(window_fraction(0.8, 10, 5000, false), 0.8);
        assert_eq!(window_fraction(0.8, 11, 5000, false), 0.4);
        assert_eq!(window_fraction(0.8, 4999, 5000, false), 0.8 / 128.0);
    }

    #[test]
    fn the_l2_block_is_a_signed_unit_bump() {
        let b = pseudo_gaussian(5, Norm::L2, tch::Device::Cpu);
        assert!((b.square().sum(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-5);
        // Positive in the first two rows (or columns, when transposed), negative in the rest.
        let halves = |dim: i64| {
            let v = Vec::<f32>::try_from(b.sum_dim_intlist(dim, false, Kind::Float)).unwrap();
            v[..2].iter().all(|x| *x > 0.0) && v[2..].iter().all(|x| *x < 0.0)
        };
        assert!(halves(1) || halves(0), "{b}");
        let r = rings(3, 3, Norm::L2);
        // Centre ring weighted 1 + 1/4, outer ring 1/4.
        assert!((r[4] / r[0] - 5.0).abs() < 1e-9, "{r:?}");
        // L1: 1 + 1/16 against 1/16, unit L1 norm.
        let r = rings(3, 3, Norm::L1);
        assert!((r[4] / r[0] - 17.0).abs() < 1e-9, "{r:?}");
        assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
}
