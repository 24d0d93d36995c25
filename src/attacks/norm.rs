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
}

impl FromStr for Norm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "linf" | "inf" => Ok(Norm::Linf),
            "l2" => Ok(Norm::L2),
            "l1" => Err("norm 'l1': not implemented yet (linf and l2 are)".into()),
            _ => Err(format!("unknown norm '{s}': expected linf or l2")),
        }
    }
}

impl fmt::Display for Norm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
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
    /// Unit-size steepest-ascent direction for gradient `g`: sign(g) for Linf, g/||g||_2 for L2.
    pub fn direction(self, g: &Tensor) -> Tensor {
        match self {
            Norm::Linf => g.sign(),
            Norm::L2 => g / (l2_per_sample(g) + 1e-12),
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
        };
        (x0 + delta).clamp(0.0, 1.0)
    }

    /// A random point of the eps-ball around x0 (uniform in the Linf box; on the L2 sphere),
    /// then clipped to [0,1]. Uses libtorch's generator (seeded by the caller).
    pub fn random_start(self, x0: &Tensor, eps: f64) -> Tensor {
        let delta = match self {
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
        }
    }
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
        for (norm, eps) in [(Norm::Linf, 8.0 / 255.0), (Norm::L2, 0.5)] {
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
        assert!(
            "l1".parse::<Norm>()
                .unwrap_err()
                .contains("not implemented")
        );
        assert!("l3".parse::<Norm>().unwrap_err().contains("linf or l2"));
    }
}
