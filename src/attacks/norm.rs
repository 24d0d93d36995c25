//! The geometry of each threat model: steepest-ascent direction, projection onto the eps-ball
//! intersected with [0,1], random starts, and perturbation norms.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    Linf,
    L2,
    L1,
}

impl FromStr for Norm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "linf" | "inf" => Ok(Norm::Linf),
            "l2" => Ok(Norm::L2),
            "l1" => Ok(Norm::L1),
            _ => Err(format!("unknown norm '{s}': expected linf, l2 or l1")),
        }
    }
}

impl fmt::Display for Norm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
            Norm::L1 => "l1",
        })
    }
}

/// Per-sample L2 norm over all but the first dimension, shaped N x 1 x 1 x 1 for broadcasting.
fn l2_per_sample(t: &Tensor) -> Tensor {
    let n = t.size()[0];
    let shape: Vec<i64> = std::iter::once(n)
        .chain(std::iter::repeat_n(1, t.dim() - 1))
        .collect();
    t.reshape([n, -1])
        .square()
        .sum_dim_intlist(1, false, Kind::Float)
        .sqrt()
        .reshape(shape)
}

impl Norm {
    /// Unit-size ascent direction for gradient `g`: sign(g) for Linf, g/||g||_2 for L2. For L1
    /// the steepest direction moves a single pixel, so, as APGD-L1 and SLIDE do, it moves the
    /// top 20 % of coordinates by |g| equally (unit L1 norm).
    pub fn direction(self, g: &Tensor) -> Tensor {
        match self {
            Norm::Linf => g.sign(),
            Norm::L2 => g / (l2_per_sample(g) + 1e-12),
            Norm::L1 => sparse_direction(
                g,
                &Tensor::full([g.size()[0]], 0.2, (Kind::Float, g.device())),
            ),
        }
    }

    /// Projects `x` onto {||x - x0|| <= eps} ∩ [0,1]. For L2 the ball is projected first and
    /// then the box; clipping towards x0 (which is inside the box) can only shrink the norm.
    pub fn project(self, x: &Tensor, x0: &Tensor, eps: f64) -> Tensor {
        let delta = x - x0;
        let delta = match self {
            Norm::Linf => delta.clamp(-eps, eps),
            Norm::L2 => {
                let n = l2_per_sample(&delta);
                let factor = (eps / (n + 1e-12)).clamp_max(1.0);
                delta * factor
            }
            // The box is part of the L1 projection (clipping afterwards would not be a
            // projection onto the intersection).
            Norm::L1 => return x0 + l1_box_projection(x0, &delta, eps),
        };
        (x0 + delta).clamp(0.0, 1.0)
    }

    /// A random point of the eps-ball around x0 (uniform in the Linf box; on the L2 sphere;
    /// for L1 a Gaussian projected onto the ball and box, as AutoAttack's APGD-L1 starts),
    /// then clipped to [0,1]. Uses libtorch's generator (seeded by the caller).
    pub fn random_start(self, x0: &Tensor, eps: f64) -> Tensor {
        let delta = match self {
            Norm::L1 => return self.project(&(x0 + x0.randn_like()), x0, eps),
            Norm::Linf => (x0.rand_like() * 2.0 - 1.0) * eps,
            Norm::L2 => {
                let t = x0.randn_like();
                &t / (l2_per_sample(&t) + 1e-12) * eps
            }
        };
        (x0 + delta).clamp(0.0, 1.0)
    }

    /// Per-sample norm of `delta` (N values).
    pub fn measure(self, delta: &Tensor) -> Tensor {
        let n = delta.size()[0];
        let flat = delta.reshape([n, -1]).to_kind(Kind::Float);
        match self {
            Norm::Linf => flat.abs().amax([1], false),
            Norm::L2 => flat.square().sum_dim_intlist(1, false, Kind::Float).sqrt(),
            Norm::L1 => flat.abs().sum_dim_intlist(1, false, Kind::Float),
        }
    }
}

/// sign(g) on the coordinates whose |g| reaches the sample's (1 - fraction) quantile (ties
/// included, so possibly more than a `fraction` of them), scaled to unit L1 norm. `fraction`
/// holds one value per sample.
pub fn sparse_direction(g: &Tensor, fraction: &Tensor) -> Tensor {
    let n = g.size()[0];
    let flat = g.reshape([n, -1]);
    let d = flat.size()[1];
    let (sorted, _) = flat.abs().sort(1, false);
    let at = ((fraction.to_kind(Kind::Float).neg() + 1.0) * d as f64)
        .clamp(0.0, (d - 1) as f64)
        .to_kind(Kind::Int64)
        .view([n, 1]);
    let threshold = sorted.gather(1, &at, false);
    let s = flat.sign() * flat.abs().ge_tensor(&threshold).to_kind(flat.kind());
    let count = s.abs().sum_dim_intlist(1, true, Kind::Float);
    (s / (count + 1e-10)).reshape(g.size().as_slice())
}

/// The Euclidean projection of `x0 + delta` onto {||z - x0||_1 <= eps} ∩ [0,1]^D, returned as a
/// step from x0. Coordinate i becomes sign(delta_i) * min(room_i, max(|delta_i| - lambda, 0))
/// with room_i the distance to the box edge in that direction; lambda = 0 when the clipped
/// step is already inside the ball, otherwise the lambda that makes the L1 norm exactly eps,
/// found by bisection (the norm is monotone in lambda; 60 halvings reach float precision).
pub fn l1_box_projection(x0: &Tensor, delta: &Tensor, eps: f64) -> Tensor {
    let shape = delta.size();
    let n = shape[0];
    let d = delta.reshape([n, -1]).to_kind(Kind::Float);
    let x = x0.reshape([n, -1]).to_kind(Kind::Float);
    let room = (x.ones_like() - &x).where_self(&d.gt(0.0), &x);
    let mag = d.abs();
    let shrink = |lambda: &Tensor| (&mag - lambda).clamp_min(0.0).minimum(&room);
    let total = |lambda: &Tensor| shrink(lambda).sum_dim_intlist(1, true, Kind::Float);
    let zero = Tensor::zeros([n, 1], (Kind::Float, d.device()));
    let inside = total(&zero).le(eps);
    let mut lo = zero.shallow_clone();
    let mut hi = mag.amax([1], true);
    for _ in 0..60 {
        let mid = (&lo + &hi) * 0.5;
        let over = total(&mid).gt(eps);
        lo = mid.where_self(&over, &lo);
        hi = hi.where_self(&over, &mid);
    }
    // `hi` always satisfies the budget; lambda = 0 where no shrinking is needed.
    let lambda = zero.where_self(&inside, &hi);
    (shrink(&lambda) * d.sign()).reshape(shape.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn projection_lands_in_ball_and_box() {
        tch::manual_seed(1);
        let x0 = Tensor::rand([4, 3, 8, 8], (Kind::Float, Device::Cpu));
        let far = Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu)) * 3.0;
        for (norm, eps) in [(Norm::Linf, 8.0 / 255.0), (Norm::L2, 0.5), (Norm::L1, 12.0)] {
            let p = norm.project(&far, &x0, eps);
            let d = norm.measure(&(&p - &x0)).max().double_value(&[]);
            assert!(d <= eps + 1e-6, "{norm}: {d} > {eps}");
            assert!(p.min().double_value(&[]) >= 0.0 && p.max().double_value(&[]) <= 1.0);
            let r = norm.random_start(&x0, eps);
            let d = norm.measure(&(&r - &x0)).max().double_value(&[]);
            assert!(d <= eps + 1e-6, "{norm} random start: {d} > {eps}");
        }
        // Already inside: unchanged.
        let inside = &x0 + 0.001;
        let p = Norm::L2.project(&inside.clamp(0.0, 1.0), &x0, 10.0);
        assert!((p - inside.clamp(0.0, 1.0)).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn l2_direction_has_unit_norm() {
        let g = Tensor::randn([3, 3, 4, 4], (Kind::Float, Device::Cpu));
        let n = Norm::L2.measure(&Norm::L2.direction(&g));
        assert!((n - 1.0).abs().max().double_value(&[]) < 1e-5);
        assert_eq!("L1".parse::<Norm>().unwrap(), Norm::L1);
        assert!("l3".parse::<Norm>().unwrap_err().contains("linf, l2 or l1"));
        let n = Norm::L1.measure(&Norm::L1.direction(&g));
        assert!((n - 1.0).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn l1_projection_is_the_euclidean_projection_onto_ball_and_box() {
        tch::manual_seed(4);
        let x0 = Tensor::rand([5, 3, 4, 4], (Kind::Float, Device::Cpu));
        let delta = Tensor::randn([5, 3, 4, 4], (Kind::Float, Device::Cpu)) * 0.4;
        let eps = 2.0;
        let z = l1_box_projection(&x0, &delta, eps);
        let p = &x0 + &z;
        assert!(p.min().double_value(&[]) >= 0.0 && p.max().double_value(&[]) <= 1.0);
        let norms = Norm::L1.measure(&z);
        assert!(
            (norms - eps).abs().max().double_value(&[]) < 1e-4,
            "not on the sphere"
        );
        // KKT: every coordinate strictly inside the box and not zeroed is shrunk by the same lambda.
        for i in 0..5 {
            let (d, zi, pi) = (
                delta.get(i).reshape([-1]),
                z.get(i).reshape([-1]),
                p.get(i).reshape([-1]),
            );
            let interior = pi
                .gt(1e-6)
                .logical_and(&pi.lt(1.0 - 1e-6))
                .logical_and(&zi.abs().gt(1e-6));
            let shrink = (d.abs() - zi.abs()).masked_select(&interior);
            let spread = (shrink.max() - shrink.min()).double_value(&[]);
            assert!(spread < 1e-4, "sample {i}: shrinkage varies by {spread}");
            // Zeroed coordinates were smaller than lambda.
            let lambda = shrink.mean(Kind::Float).double_value(&[]);
            let zeroed = d.abs().masked_select(
                &zi.abs()
                    .le(1e-7)
                    .logical_and(&pi.gt(1e-6))
                    .logical_and(&pi.lt(1.0 - 1e-6)),
            );
            if zeroed.numel() > 0 {
                assert!(zeroed.max().double_value(&[]) <= lambda + 1e-4);
            }
        }
        // Inside the ball: only the box clip applies.
        let small = &delta * 0.001;
        let z = l1_box_projection(&x0, &small, eps);
        let clipped = (&x0 + &small).clamp(0.0, 1.0) - &x0;
        assert!((z - clipped).abs().max().double_value(&[]) < 1e-7);
    }
}
