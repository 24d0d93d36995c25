//! The one place gradient attacks get their gradients: the objective's input gradient averaged
//! over `eot` independent passes of a (possibly stochastic) model (Expectation over
//! Transformation), with a tally of zero and non-finite gradients, which are signs of
//! gradient masking rather than of robustness.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::models::Model;

/// What the gradients looked like during an attack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GradStats {
    /// Gradient evaluations (per sample) made.
    pub evaluations: u64,
    /// ... of which the gradient was exactly zero.
    pub zero: u64,
    /// ... of which the gradient held NaN or infinity (replaced by zero for the step).
    pub non_finite: u64,
}

impl GradStats {
    pub fn add(&mut self, other: GradStats) {
        self.evaluations += other.evaluations;
        self.zero += other.zero;
        self.non_finite += other.non_finite;
    }

    /// Fraction of gradient evaluations that were zero or non-finite.
    pub fn masked_fraction(&self) -> f64 {
        if self.evaluations == 0 {
            return 0.0;
        }
        (self.zero + self.non_finite) as f64 / self.evaluations as f64
    }
}

/// Objective value, input gradient and logits at `x`, each averaged over `eot` passes.
pub struct Evaluation {
    /// N values.
    pub loss: Tensor,
    /// Same shape as x; non-finite entries replaced by zero.
    pub grad: Tensor,
    /// N x classes.
    pub logits: Tensor,
}

pub fn evaluate(
    model: &dyn Model,
    x: &Tensor,
    objective: &dyn Fn(&Tensor) -> Tensor,
    eot: usize,
    stats: &mut GradStats,
) -> Evaluation {
    let eot = eot.max(1);
    let mut loss_sum: Option<Tensor> = None;
    let mut grad_sum: Option<Tensor> = None;
    let mut logit_sum: Option<Tensor> = None;
    for _ in 0..eot {
        let xg = x.detach().set_requires_grad(true);
        let logits = model.logits(&xg);
        let loss = objective(&logits);
        let g = Tensor::run_backward(&[loss.sum(Kind::Float)], &[&xg], false, false)
            .pop()
            .expect("one input, one gradient");
        let (loss, logits) = (loss.detach(), logits.detach().to_kind(Kind::Float));
        grad_sum = Some(match grad_sum {
            Some(s) => s + g,
            None => g,
        });
        loss_sum = Some(match loss_sum {
            Some(s) => s + loss,
            None => loss,
        });
        logit_sum = Some(match logit_sum {
            Some(s) => s + logits,
            None => logits,
        });
    }
    let k = eot as f64;
    let (mut grad, mut loss, mut logits) = (
        grad_sum.expect("eot >= 1"),
        loss_sum.expect("eot >= 1"),
        logit_sum.expect("eot >= 1"),
    );
    if eot > 1 {
        grad /= k;
        loss /= k;
        logits /= k;
    }
    // One reduction answers both questions: the largest |g| is 0 for a zero gradient and
    // NaN/inf when any entry is.
    let n = grad.size()[0];
    let peak = grad.reshape([n, -1]).abs().amax([1], false);
    let zero = peak.eq(0.0).sum(Kind::Int64).int64_value(&[]) as u64;
    let finite = peak.isfinite().sum(Kind::Int64).int64_value(&[]) as u64;
    stats.evaluations += n as u64;
    stats.zero += zero;
    stats.non_finite += n as u64 - finite;
    if finite < n as u64 {
        grad = grad.nan_to_num(0.0, 0.0, 0.0);
    }
    Evaluation { loss, grad, logits }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::pipeline::{Pipeline, Quantize};
    use tch::nn::{self, Module};
    use tch::{Device, Kind};

    /// A double-precision model small enough for central differences to be exact-ish.
    struct Tiny {
        lin: nn::Linear,
        _vs: nn::VarStore,
    }

    impl Model for Tiny {
        fn logits(&self, x: &Tensor) -> Tensor {
            self.lin.forward(&x.flatten(1, -1)).tanh() * 3.0
        }
        fn num_classes(&self) -> usize {
            4
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn describe(&self) -> String {
            "tiny".into()
        }
    }

    fn tiny() -> Tiny {
        tch::manual_seed(0);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root(), 12, 4, Default::default());
        vs.double();
        Tiny { lin, _vs: vs }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let model = tiny();
        let x = Tensor::rand([2, 3, 2, 2], (Kind::Double, Device::Cpu));
        let y = Tensor::from_slice(&[1i64, 3]);
        type Objective<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
        let losses: [(&str, Objective); 3] = [
            ("ce", Box::new(|z: &Tensor| super::super::loss::ce(z, &y))),
            (
                "margin",
                Box::new(|z: &Tensor| super::super::loss::margin(z, &y)),
            ),
            ("dlr", Box::new(|z: &Tensor| super::super::loss::dlr(z, &y))),
        ];
        for (name, f) in &losses {
            let mut stats = GradStats::default();
            let e = evaluate(&model, &x, f.as_ref(), 1, &mut stats);
            let h = 1e-6;
            let flat = x.reshape([-1]);
            let g = e.grad.reshape([-1]);
            for i in 0..flat.size()[0] {
                let xp = flat.copy();
                let xm = flat.copy();
                let _ = xp.get(i).g_add_scalar_(h);
                let _ = xm.get(i).g_sub_scalar_(h);
                let lp = f(&model.logits(&xp.view([2, 3, 2, 2]))).sum(Kind::Double);
                let lm = f(&model.logits(&xm.view([2, 3, 2, 2]))).sum(Kind::Double);
                let fd = (lp - lm).double_value(&[]) / (2.0 * h);
                let an = g.double_value(&[i]);
                assert!(
                    (fd - an).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{name} pixel {i}: finite difference {fd}, autograd {an}"
                );
            }
            assert_eq!(stats.zero, 0);
        }
    }

    struct NanModel(Tiny);

    impl Model for NanModel {
        fn logits(&self, x: &Tensor) -> Tensor {
            // log of a negative number: NaN logits and NaN gradients.
            self.0.logits(&(x - 2.0).log())
        }
        fn num_classes(&self) -> usize {
            4
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn describe(&self) -> String {
            "nan".into()
        }
    }

    #[test]
    fn non_finite_gradients_are_counted_and_zeroed() {
        let model = NanModel(tiny());
        let x = Tensor::rand([3, 3, 2, 2], (Kind::Double, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2]);
        let mut stats = GradStats::default();
        let e = evaluate(
            &model,
            &x,
            &|z| super::super::loss::ce(z, &y),
            1,
            &mut stats,
        );
        assert_eq!((stats.evaluations, stats.non_finite), (3, 3));
        assert!(bool::try_from(e.grad.isfinite().all()).unwrap());
    }

    #[test]
    fn zero_gradients_are_counted() {
        let model = tiny();
        let q = Pipeline {
            stages: vec![Box::new(Quantize { levels: 8 })],
            model: &model,
        };
        let x = Tensor::rand([3, 3, 2, 2], (Kind::Double, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2]);
        let mut stats = GradStats::default();
        let _ = evaluate(&q, &x, &|z| super::super::loss::ce(z, &y), 2, &mut stats);
        assert_eq!((stats.evaluations, stats.zero), (3, 3));
        assert_eq!(stats.masked_fraction(), 1.0);
    }
}
