//! FAB-T (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive
//! boundary attack"), the targeted version AutoAttack runs: for each of the top-`targets`
//! other classes (by clean logit), linearise `g = z_t - z_y` at the current iterate and step
//! towards the nearest point of that hyperplane inside the [0,1] box, mixing the step from the
//! iterate with the one from the original image (weight alpha <= alpha_max, overshoot eta).
//! When an iterate is misclassified it is recorded if it is the smallest perturbation so far,
//! and pulled back towards the original (factor beta), so the search closes in on the boundary.
//!
//! FAB minimises the norm; under a budget a sample counts as broken when its smallest
//! adversarial has norm <= eps (the clean image is returned otherwise). As in AutoAttack,
//! "adversarial" means misclassified, also in the targeted version. Defaults: 100 iterations,
//! 9 targets, alpha_max 0.1, eta 1.05, beta 0.9; restarts after the first start at a random
//! point at radius eps/2.
//!
//! On a random model each iterate is judged on K fresh draws (a majority counts as
//! adversarial for the pull-back), and among the iterates inside the budget the image returned
//! follows the selection rule of [`super::select`].

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

use super::grad::{GradStats, evaluate, predict};
use super::select::{Keeper, Selection, claim_of, reclaim, share_fooled};
use super::{Attack, AttackOutput, Budget, Norm, on_remaining};
use crate::models::Model;

pub struct FabT {
    pub budget: Budget,
    pub steps: usize,
    pub targets: usize,
    /// Runs per target class; runs after the first start at a random point.
    pub restarts: usize,
    pub alpha_max: f64,
    pub eta: f64,
    pub beta: f64,
    pub eot: usize,
    /// The image returned on a random model.
    pub selection: Selection,
}

impl FabT {
    pub fn new(budget: Budget, steps: usize, targets: usize, restarts: usize, eot: usize) -> Self {
        FabT {
            budget,
            steps,
            targets,
            restarts,
            alpha_max: 0.1,
            eta: 1.05,
            beta: 0.9,
            eot,
            selection: Selection::default(),
        }
    }
}

fn rows(t: &Tensor) -> Tensor {
    t.view([-1, 1, 1, 1])
}

/// The smallest step `d` (in `norm`) with `<w, d> = r` that keeps `p + d` in [0,1]^D; when the
/// box does not reach the hyperplane, the box corner closest to it. Per sample: `p` and `w`
/// are N x ..., `r` has N values.
///
/// Write c = |r| and move each coordinate i by `a_i >= 0` in the direction sign(r * w_i) that
/// raises `sign(r) <w, d>`, at most its room `u_i` to the box edge. Each coordinate adds
/// |w_i| a_i. Linf and L2 minimisers fill all coordinates at once as a level `lambda` rises
/// (Linf: a_i = min(lambda, u_i); L2: a_i = min(lambda |w_i|, u_i), the KKT solution), so the
/// total is piecewise linear in lambda and solved exactly between sorted breakpoints. L1 is a
/// fractional knapsack: coordinates in order of |w_i| move fully until one closes the gap.
pub fn project_to_plane(norm: Norm, p: &Tensor, w: &Tensor, r: &Tensor) -> Tensor {
    let shape = p.size();
    let n = shape[0];
    let p = p.reshape([n, -1]).to_kind(Kind::Float);
    let w = w.reshape([n, -1]).to_kind(Kind::Float);
    let r = r.to_kind(Kind::Float).view([n, 1]);
    let sw = &w * r.sign();
    let up = sw.gt(0.0);
    let room = (p.ones_like() - &p).where_self(&up, &p) * sw.ne(0.0).to_kind(Kind::Float);
    let aw = sw.abs();
    let c = r.abs();
    let a = match norm {
        Norm::Linf | Norm::L2 => {
            // Breakpoint of each coordinate (the level at which it hits its room) and the rate
            // it contributes before that.
            let live = aw.gt(1e-12);
            let (bp, rate) = match norm {
                Norm::Linf => (room.shallow_clone(), aw.shallow_clone()),
                _ => (
                    (&room / aw.clamp_min(1e-12)).where_self(&live, &room.zeros_like()),
                    aw.square(),
                ),
            };
            let (bp_sorted, order) = bp.sort(1, false);
            let full = (&aw * &room)
                .gather(1, &order, false)
                .cumsum(1, Kind::Float);
            let rate_left = rate.sum_dim_intlist(1, true, Kind::Float)
                - rate.gather(1, &order, false).cumsum(1, Kind::Float);
            // Total at each breakpoint: saturated coordinates plus the rest at that level.
            let at_bp = &full + &bp_sorted * &rate_left;
            let k = at_bp.lt_tensor(&c).sum_dim_intlist(1, true, Kind::Int64);
            let d = bp.size()[1];
            let prev = (&k - 1).clamp_min(0);
            let has_prev = k.gt(0).to_kind(Kind::Float);
            let full_prev = full.gather(1, &prev, false) * &has_prev;
            let rate_prev = rate_left.gather(1, &prev, false) * &has_prev
                + rate.sum_dim_intlist(1, true, Kind::Float) * (has_prev.neg() + 1.0);
            let lambda = ((&c - full_prev) / rate_prev.clamp_min(1e-30)).clamp_min(0.0);
            // Beyond the last breakpoint the plane is out of reach: take the whole room.
            let lambda = lambda.where_self(&k.lt(d), &Tensor::full_like(&lambda, 1e30));
            let a = match norm {
                Norm::Linf => lambda.minimum(&room),
                _ => (&lambda * &aw).minimum(&room),
            };
            a * live.to_kind(Kind::Float)
        }
        Norm::L1 => {
            let (_, order) = aw.sort(1, true);
            let gain = (&aw * &room).gather(1, &order, false);
            let before = gain.cumsum(1, Kind::Float) - &gain;
            let w_sorted = aw.gather(1, &order, false);
            let room_sorted = room.gather(1, &order, false);
            let need = (&c - &before).clamp_min(0.0);
            let part = (need / w_sorted.clamp_min(1e-12)).minimum(&room_sorted)
                * w_sorted.gt(1e-12).to_kind(Kind::Float);
            part.zeros_like().scatter(1, &order, &part)
        }
    };
    (a * sw.sign()).reshape(shape.as_slice())
}

impl FabT {
    /// One run towards target `t` from `x` (or a random start): (images, claims), where on a
    /// deterministic model success (claim 1) means a misclassified point with perturbation norm
    /// <= eps was found.
    fn single_run(
        &self,
        model: &dyn Model,
        x: &Tensor,
        y: &Tensor,
        t: &Tensor,
        random_start: bool,
        stats: &mut GradStats,
    ) -> (Tensor, Tensor) {
        let Budget { norm, eps } = self.budget;
        let n = x.size()[0];
        let mut x1 = if random_start {
            norm.random_start(x, eps * 0.5)
        } else {
            x.copy()
        };
        let mut best = x.copy();
        let mut best_norm = Tensor::full([n], f64::INFINITY, (Kind::Float, x.device()));
        let objective = |z: &Tensor| {
            z.gather(1, &t.unsqueeze(1), false).squeeze_dim(1)
                - z.gather(1, &y.unsqueeze(1), false).squeeze_dim(1)
        };
        let fooled = |z: &Tensor| z.argmax(-1, false).ne_tensor(y);
        let within = |d: &Tensor| d.le(eps * (1.0 + 1e-6));
        let mut keep = Keeper::for_model(model, self.selection.for_min_norm(), self.eot, x);
        for _ in 0..self.steps {
            let e = evaluate(model, &x1, y, &objective, self.eot, stats);
            let w = e.grad;
            // The linearised boundary g(x1) + <w, z - x1> = 0, reached from x1 and from x.
            let r1 = -&e.loss;
            let r0 = -(&e.loss
                + (&w * (x - &x1))
                    .flatten(1, -1)
                    .sum_dim_intlist(1, false, Kind::Float));
            let d1 = project_to_plane(norm, &x1, &w, &r1);
            let d0 = project_to_plane(norm, x, &w, &r0);
            let a1 = norm.measure(&d1).clamp_min(1e-8);
            let a0 = norm.measure(&d0).clamp_min(1e-8);
            let alpha = rows(&(&a1 / (&a1 + &a0)).clamp(0.0, self.alpha_max));
            x1 = ((&x1 + d1 * self.eta) * (alpha.neg() + 1.0) + (x + d0 * self.eta) * &alpha)
                .clamp(0.0, 1.0);
            let dist = norm.measure(&(&x1 - x));
            let adv = match &mut keep {
                Some(k) => {
                    let draws = predict(model, &x1, self.eot);
                    let mean = (0..draws.size()[0])
                        .map(|j| objective(&draws.get(j)))
                        .reduce(|a, b| a + b)
                        .expect("at least one draw")
                        / draws.size()[0] as f64;
                    k.offer(&x1, &draws, &mean, &fooled, Some(&within(&dist)));
                    share_fooled(&draws, &fooled).gt(0.5)
                }
                None => fooled(&tch::no_grad(|| model.logits(&x1))),
            };
            let better = adv.logical_and(&dist.lt_tensor(&best_norm));
            best = x1.where_self(&rows(&better), &best);
            best_norm = dist.where_self(&better, &best_norm);
            // Back towards the original: the next steps search for a closer boundary point.
            x1 = (x + (&x1 - x) * self.beta).where_self(&rows(&adv), &x1);
        }
        if let Some(k) = keep {
            return k.finish(model, &fooled);
        }
        // Float rounding of x + delta may exceed eps by an ulp; the runner allows for that.
        let success = within(&best_norm);
        (best.where_self(&rows(&success), x), claim_of(&success))
    }
}

impl Attack for FabT {
    fn name(&self) -> String {
        "fab-t".into()
    }
    fn budget(&self) -> Budget {
        self.budget
    }
    fn run(&self, model: &dyn Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<AttackOutput> {
        let classes = model.num_classes();
        if classes < 2 {
            bail!("fab-t needs at least 2 classes (the model has {classes})");
        }
        let targets = self.targets;
        if targets > classes - 1 {
            bail!(
                "targets = {targets}: the model has {classes} classes, so at most {} target classes",
                classes - 1
            );
        }
        let mut stats = GradStats::default();
        let order = super::target_order(model, x, y);
        let (x_adv, mut claimed) =
            on_remaining(x, y, targets * self.restarts, seed, |r, idx, xs, ys| {
                let t = order
                    .index_select(0, idx)
                    .select(1, (r / self.restarts) as i64);
                self.single_run(model, xs, ys, &t, r % self.restarts > 0, &mut stats)
            });
        if targets * self.restarts > 1 {
            let fooled = |z: &Tensor| z.argmax(-1, false).ne_tensor(y);
            claimed = reclaim(model, self.selection, self.eot, &x_adv, claimed, &fooled);
        }
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
    use tch::Device;

    /// The projection step for one sample, as f64 values.
    fn check(norm: Norm, p: &[f64], w: &[f64], r: f64) -> Vec<f64> {
        let t = |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).view([1, -1]);
        let d = project_to_plane(norm, &t(p), &t(w), &Tensor::from_slice(&[r as f32]));
        Vec::<f32>::try_from(d.view([-1]))
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn plane_projections_reach_the_plane_with_the_smallest_step() {
        let p = [0.5, 0.9, 0.1, 0.0, 1.0];
        let w = [1.0, -2.0, 0.5, 0.0, 3.0];
        for r in [0.3, -0.4, 0.0] {
            for norm in [Norm::Linf, Norm::L2, Norm::L1] {
                let d = check(norm, &p, &w, r);
                assert!(
                    (dot(&w, &d) - r).abs() < 1e-5,
                    "{norm} r={r}: <w,d> = {}",
                    dot(&w, &d)
                );
                for (pi, di) in p.iter().zip(&d) {
                    assert!(
                        (-1e-6..=1.0 + 1e-6).contains(&(pi + di)),
                        "{norm}: left the box"
                    );
                }
                if r == 0.0 {
                    assert!(d.iter().all(|v| *v == 0.0));
                }
            }
        }
        // Known minimisers. r = 0.3 from p: the raising directions are +x0 (room 0.5),
        // -x1 (room 0.9, weight 2), +x2 (room 0.9), x4 is at its upper edge.
        // Linf: |1| l + 2 l + 0.5 l = 0.3 -> l = 0.3 / 3.5.
        let d = check(Norm::Linf, &p, &w, 0.3);
        let l = 0.3 / 3.5;
        for (got, want) in d.iter().zip([l, -l, l, 0.0, 0.0]) {
            assert!((got - want).abs() < 1e-6, "linf {d:?}");
        }
        // L2: d = lambda * w on the free coordinates: lambda (1 + 4 + 0.25) = 0.3.
        let d = check(Norm::L2, &p, &w, 0.3);
        let l = 0.3 / 5.25;
        for (got, want) in d.iter().zip([l, -2.0 * l, 0.5 * l, 0.0, 0.0]) {
            assert!((got - want).abs() < 1e-6, "l2 {d:?}");
        }
        // L1: the largest usable weight (x1, 2) alone closes the gap: -0.15.
        let d = check(Norm::L1, &p, &w, 0.3);
        for (got, want) in d.iter().zip([0.0, -0.15, 0.0, 0.0, 0.0]) {
            assert!((got - want).abs() < 1e-6, "l1 {d:?}");
        }
        // Saturation: Linf with a level beyond x0's room 0.5 (r = 1.9): x0 takes 0.5, then
        // 2 l + 0.5 l = 1.4 -> l = 0.56.
        let d = check(Norm::Linf, &p, &w, 1.9);
        for (got, want) in d.iter().zip([0.5, -0.56, 0.56, 0.0, 0.0]) {
            assert!((got - want).abs() < 1e-5, "linf saturated {d:?}");
        }
        // Out of reach: the corner (0.5 + 1.8 + 0.45 = 2.75 < 10).
        for norm in [Norm::Linf, Norm::L2, Norm::L1] {
            let d = check(norm, &p, &w, 10.0);
            for (got, want) in d.iter().zip([0.5, -0.9, 0.9, 0.0, 0.0]) {
                assert!((got - want).abs() < 1e-6, "{norm} corner {d:?}");
            }
        }
    }

    #[test]
    fn l2_projection_satisfies_the_optimality_conditions() {
        tch::manual_seed(3);
        let p = Tensor::rand([6, 40], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([6, 40], (Kind::Float, Device::Cpu));
        let r = Tensor::randn([6], (Kind::Float, Device::Cpu)) * 2.0;
        let d = project_to_plane(Norm::L2, &p, &w, &r);
        let reach = (&w * &d).sum_dim_intlist(1, false, Kind::Float);
        assert!((&reach - &r).abs().max().double_value(&[]) < 1e-4);
        // KKT: on the coordinates not at a box edge, d is parallel to w.
        for i in 0..6 {
            let di = d.get(i);
            let pi = p.get(i);
            let free = (&pi + &di)
                .gt(1e-5)
                .logical_and(&(&pi + &di).lt(1.0 - 1e-5));
            let ratio = (&di / w.get(i)).masked_select(&free.logical_and(&w.get(i).abs().gt(1e-3)));
            let spread = (ratio.max() - ratio.min()).double_value(&[]);
            assert!(spread < 1e-4, "sample {i}: d/w varies by {spread}");
        }
    }
}
