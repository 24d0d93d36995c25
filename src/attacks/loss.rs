//! Per-sample attack objectives, all to be maximised.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Cross-entropy.
    Ce,
    /// Carlini-Wagner margin: max_{j != y} z_j - z_y.
    Margin,
}

/// Logits in at least single precision (bf16 autocast output is widened; double stays double,
/// which the finite-difference tests rely on).
fn widen(logits: &Tensor) -> Tensor {
    match logits.kind() {
        Kind::Double => logits.shallow_clone(),
        _ => logits.to_kind(Kind::Float),
    }
}

/// Cross-entropy of each sample (N values).
pub fn ce(logits: &Tensor, y: &Tensor) -> Tensor {
    widen(logits).cross_entropy_loss::<Tensor>(y, None, tch::Reduction::None, -100, 0.0)
}

/// Largest logit among the classes other than `y` (N values).
fn max_other(z: &Tensor, y: &Tensor) -> Tensor {
    let mask = z
        .zeros_like()
        .scatter_value(1, &y.unsqueeze(1), f64::INFINITY);
    (z - mask).amax([1], false)
}

fn logit_of(z: &Tensor, y: &Tensor) -> Tensor {
    z.gather(1, &y.unsqueeze(1), false).squeeze_dim(1)
}

/// max_{j != y} z_j - z_y: positive exactly when the sample is misclassified.
pub fn margin(logits: &Tensor, y: &Tensor) -> Tensor {
    let z = widen(logits);
    max_other(&z, y) - logit_of(&z, y)
}

/// Targeted objectives (maximised when the prediction moves to `t`).
pub fn ce_targeted(logits: &Tensor, t: &Tensor) -> Tensor {
    -ce(logits, t)
}

pub fn margin_targeted(logits: &Tensor, t: &Tensor) -> Tensor {
    -margin(logits, t)
}

/// Difference of Logits Ratio (Croce & Hein 2020): -(z_y - max_{j!=y} z_j) / (z_(1) - z_(3)),
/// where z_(k) is the k-th largest logit. Invariant to shifting and rescaling the logits.
/// Needs at least 3 classes.
pub fn dlr(logits: &Tensor, y: &Tensor) -> Tensor {
    let z = widen(logits);
    let (sorted, _) = z.sort(1, true);
    let denom = sorted.select(1, 0) - sorted.select(1, 2) + 1e-12;
    -(logit_of(&z, y) - max_other(&z, y)) / denom
}

/// Targeted DLR: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2). Needs at least 4 classes.
pub fn dlr_targeted(logits: &Tensor, y: &Tensor, t: &Tensor) -> Tensor {
    let z = widen(logits);
    let (sorted, _) = z.sort(1, true);
    let denom = sorted.select(1, 0) - (sorted.select(1, 2) + sorted.select(1, 3)) * 0.5 + 1e-12;
    -(logit_of(&z, y) - logit_of(&z, t)) / denom
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn margin_and_dlr_by_hand() {
        let z = Tensor::from_slice(&[3.0f32, 1.0, 0.0, -1.0, 2.0, 5.0, 0.0, 1.0]).view([2, 4]);
        let y = Tensor::from_slice(&[0i64, 0]);
        let m = Vec::<f32>::try_from(margin(&z, &y)).unwrap();
        assert_eq!(m, vec![-2.0, 3.0]);
        // Sample 0: -(3 - 1) / (3 - 0) ; sample 1: -(2 - 5) / (5 - 1).
        let d = Vec::<f32>::try_from(dlr(&z, &y)).unwrap();
        assert!(
            (d[0] + 2.0 / 3.0).abs() < 1e-6 && (d[1] - 0.75).abs() < 1e-6,
            "{d:?}"
        );
        let t = Tensor::from_slice(&[3i64, 1]);
        // Sample 0: -(3 - (-1)) / (3 - (0 + -1)/2); sample 1: -(2 - 5) / (5 - (1 + 0)/2).
        let d = Vec::<f32>::try_from(dlr_targeted(&z, &y, &t)).unwrap();
        assert!(
            (d[0] + 4.0 / 3.5).abs() < 1e-6 && (d[1] - 3.0 / 4.5).abs() < 1e-6,
            "{d:?}"
        );
        let c = ce(&z, &y);
        assert_eq!(c.size(), vec![2]);
        assert_eq!(c.device(), Device::Cpu);
    }
}
