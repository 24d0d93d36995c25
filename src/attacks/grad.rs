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
    /// Each draw's logits, K x N x classes (detached, at least single precision): what the
    /// selection rule of a random model ([`super::select`]) judges an iterate by.
    pub draws: Tensor,
}

/// How `eot` draws of a batch of `n` images (NCHW `shape`) are split into passes: all in one
/// stacked forward/backward when the model draws its randomness per image and the stack fits
/// [`runtime::eot_batch`](crate::runtime::eot_batch), else in chunks, or one draw per pass for
/// a model whose draw is shared by the batch. The sizes sum to `eot` (at least 1). The limit
/// counts images at the input's size: a model working at a larger size inside (a purifier at
/// 256 px behind 32 px images) counts each image that many times over in pixels.
pub fn eot_passes(model: &dyn Model, shape: &[i64], eot: usize) -> Vec<usize> {
    let eot = eot.max(1);
    let n = shape.first().map_or(1, |&n| n.max(1) as usize);
    let per_pass = if model.draws_per_sample() {
        let pixels = match shape {
            [.., h, w] if shape.len() >= 3 => (*h).max(1) as usize * (*w).max(1) as usize,
            _ => 1,
        };
        let scale = model
            .work_size()
            .map_or(1, |s| (s * s).div_ceil(pixels).max(1));
        (crate::runtime::eot_batch() / (n * scale)).clamp(1, eot)
    } else {
        1
    };
    let mut left = eot;
    let mut passes = Vec::with_capacity(eot.div_ceil(per_pass));
    while left > 0 {
        let c = per_pass.min(left);
        passes.push(c);
        left -= c;
    }
    passes
}

/// `x` (N x ...) repeated `copies` times along the batch: copy j of image i at row j N + i.
pub fn stacked(x: &Tensor, copies: usize) -> Tensor {
    if copies == 1 {
        return x.shallow_clone();
    }
    let mut reps = vec![1i64; x.dim()];
    reps[0] = copies as i64;
    x.repeat(reps.as_slice())
}

/// `y` (the true labels) decides which points the gradient tally covers: those the averaged
/// logits still classify correctly, or whose logits are not finite. At a point already broken
/// a flat loss is no sign of masking (DLR is constant once the true class ranks third, and
/// `eval robust` attacks every point, misclassified ones included).
pub fn evaluate(
    model: &dyn Model,
    x: &Tensor,
    y: &Tensor,
    objective: &dyn Fn(&Tensor) -> Tensor,
    eot: usize,
    stats: &mut GradStats,
) -> Evaluation {
    let eot = eot.max(1);
    let n = x.size()[0];
    let mut loss_sum: Option<Tensor> = None;
    let mut grad_sum: Option<Tensor> = None;
    let mut logit_sum: Option<Tensor> = None;
    let mut draws = Vec::new();
    for copies in eot_passes(model, &x.size(), eot) {
        // The copies hang off one leaf, so its gradient is already their sum.
        let xg = x.detach().set_requires_grad(true);
        let logits = model.logits(&stacked(&xg, copies));
        // The objective knows this batch's labels (N of them): it scores each copy in turn.
        let losses: Vec<Tensor> = (0..copies as i64)
            .map(|j| objective(&logits.narrow(0, j * n, n)))
            .collect();
        let total = losses
            .iter()
            .map(|l| l.sum(Kind::Float))
            .reduce(|a, b| a + b)
            .expect("at least one copy");
        let g = Tensor::run_backward(&[total], &[&xg], false, false)
            .pop()
            .expect("one input, one gradient");
        let loss = losses
            .into_iter()
            .map(|l| l.detach())
            .reduce(|a, b| a + b)
            .expect("at least one copy");
        let per_draw = logits
            .detach()
            .to_kind(Kind::Float)
            .view([copies as i64, n, -1]);
        let logits = per_draw.sum_dim_intlist(0, false, Kind::Float);
        draws.push(per_draw);
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
    let peak = grad.reshape([n, -1]).abs().amax([1], false);
    let finite = peak.isfinite();
    let counted = logits
        .argmax(-1, false)
        .eq_tensor(y)
        .logical_or(&logits.isfinite().all_dim(1, false).logical_not());
    let count = |t: &Tensor| t.logical_and(&counted).sum(Kind::Int64).int64_value(&[]) as u64;
    stats.evaluations += count(&counted);
    stats.zero += count(&peak.eq(0.0));
    stats.non_finite += count(&finite.logical_not());
    let finite = finite.sum(Kind::Int64).int64_value(&[]) as u64;
    if finite < n as u64 {
        grad = grad.nan_to_num(0.0, 0.0, 0.0);
    }
    Evaluation {
        loss,
        grad,
        logits,
        draws: Tensor::cat(&draws, 0),
    }
}

/// `k` draws of `model` on `x` (forward passes only, stacked as EOT stacks them): K x N x
/// classes logits in at least single precision.
pub fn predict(model: &dyn Model, x: &Tensor, k: usize) -> Tensor {
    let n = x.size()[0];
    let x = x.detach();
    let parts: Vec<Tensor> = eot_passes(model, &x.size(), k)
        .into_iter()
        .map(|copies| {
            let logits = tch::no_grad(|| model.logits(&stacked(&x, copies)));
            let logits = match logits.kind() {
                Kind::Double => logits,
                _ => logits.to_kind(Kind::Float),
            };
            logits.view([copies as i64, n, -1])
        })
        .collect();
    Tensor::cat(&parts, 0)
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
        fn draws_per_sample(&self) -> bool {
            true
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
            let e = evaluate(&model, &x, &y, f.as_ref(), 1, &mut stats);
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
            &y,
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
        // Labels the model gets right: a zero gradient there is masking.
        let y = tch::no_grad(|| q.logits(&x)).argmax(-1, false);
        let mut stats = GradStats::default();
        let _ = evaluate(
            &q,
            &x,
            &y,
            &|z| super::super::loss::ce(z, &y),
            2,
            &mut stats,
        );
        assert_eq!((stats.evaluations, stats.zero), (3, 3));
        assert_eq!(stats.masked_fraction(), 1.0);
        // Wrong labels: those points are already broken and not tallied.
        let wrong = (&y + 1).remainder(4);
        let mut stats = GradStats::default();
        let _ = evaluate(
            &q,
            &x,
            &wrong,
            &|z| super::super::loss::ce(z, &wrong),
            2,
            &mut stats,
        );
        assert_eq!((stats.evaluations, stats.zero), (0, 0));
    }

    /// `tiny` on the square of a noisy input: the input gradient depends on the noise drawn.
    struct Noisy(Tiny, f64, bool);

    impl Model for Noisy {
        fn logits(&self, x: &Tensor) -> Tensor {
            // Per image (or, with .2, one draw for the whole batch).
            let noise = if self.2 {
                x.randn_like() * self.1
            } else {
                Tensor::randn([1], (Kind::Double, Device::Cpu)) * self.1
            };
            let z = x + noise;
            self.0.logits(&(&z * &z))
        }
        fn num_classes(&self) -> usize {
            4
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn is_stochastic(&self) -> bool {
            true
        }
        fn draws_per_sample(&self) -> bool {
            self.2
        }
        fn describe(&self) -> String {
            "noisy".into()
        }
    }

    #[test]
    fn eot_draws_are_stacked_up_to_the_pass_limit() {
        let limit = crate::runtime::eot_batch() as i64;
        let m = tiny();
        assert_eq!(eot_passes(&m, &[limit, 3, 2, 2], 3), vec![1, 1, 1]);
        assert_eq!(eot_passes(&m, &[limit / 4, 3, 2, 2], 10), vec![4, 4, 2]);
        assert_eq!(eot_passes(&m, &[1, 3, 2, 2], 1), vec![1]);
        assert_eq!(eot_passes(&m, &[2, 3, 2, 2], 0), vec![1]);
        let shared = Noisy(tiny(), 0.1, false);
        assert_eq!(eot_passes(&shared, &[2, 3, 2, 2], 3), vec![1, 1, 1]);
    }

    #[test]
    fn eot_stacks_count_images_at_the_models_working_size() {
        use crate::models::pipeline::Stage;
        use crate::transforms::{Resolution, TransformConfig, TransformKind, TransformStage};
        let limit = crate::runtime::eot_batch() as i64;
        let m = tiny();
        let at = |work_size: Option<usize>| TransformStage {
            transform: TransformConfig::with_kind(TransformKind::Noise),
            resolution: Resolution {
                work_size,
                ..Resolution::default()
            },
        };
        // Noise drawn at 8 px behind 2 px images: each image holds 16 times the pixels.
        let wide = Pipeline {
            stages: vec![Box::new(at(Some(8))) as Box<dyn Stage>],
            model: &m,
        };
        assert_eq!(wide.work_size(), Some(8));
        assert_eq!(eot_passes(&wide, &[limit / 64, 3, 2, 2], 10), vec![4, 4, 2]);
        assert_eq!(eot_passes(&wide, &[limit / 16, 3, 2, 2], 3), vec![1, 1, 1]);
        // At the images' own size (or smaller), nothing changes.
        for work_size in [None, Some(2), Some(1)] {
            let plain = Pipeline {
                stages: vec![Box::new(at(work_size)) as Box<dyn Stage>],
                model: &m,
            };
            assert_eq!(eot_passes(&plain, &[limit / 4, 3, 2, 2], 10), vec![4, 4, 2]);
        }
    }

    #[test]
    fn stacked_eot_equals_one_pass_on_a_deterministic_model() {
        let model = tiny();
        let x = Tensor::rand([3, 3, 2, 2], (Kind::Double, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2]);
        let ce = |z: &Tensor| super::super::loss::ce(z, &y);
        let mut stats = GradStats::default();
        let one = evaluate(&model, &x, &y, &ce, 1, &mut stats);
        let many = evaluate(&model, &x, &y, &ce, 7, &mut stats);
        for (a, b) in [
            (&one.grad, &many.grad),
            (&one.loss, &many.loss),
            (&one.logits, &many.logits.to_kind(Kind::Float)),
        ] {
            let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 1e-6, "stacked EOT differs from one pass by {d}");
        }
        // Each call tallies the points it classifies correctly, once per call.
        let right = one
            .logits
            .argmax(-1, false)
            .eq_tensor(&y)
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(stats.evaluations, 2 * right as u64);
    }

    #[test]
    fn stacked_eot_draws_are_independent() {
        // Over seeds, the spread of a K-draw average gradient shrinks like 1/sqrt(K) when the
        // draws are independent (128 stacked draws: 1/11); K copies sharing one draw would
        // spread as much as a single draw.
        let x = Tensor::rand([2, 3, 2, 2], (Kind::Double, Device::Cpu)) + 0.5;
        let y = Tensor::from_slice(&[0i64, 1]);
        let spread = |k: usize| {
            let model = Noisy(tiny(), 0.3, true);
            let grads: Vec<Tensor> = (0..8)
                .map(|s| {
                    tch::manual_seed(s);
                    let mut stats = GradStats::default();
                    evaluate(
                        &model,
                        &x,
                        &y,
                        &|z| super::super::loss::ce(z, &y),
                        k,
                        &mut stats,
                    )
                    .grad
                })
                .collect();
            Tensor::stack(&grads, 0)
                .std_dim(0, true, false)
                .mean(Kind::Double)
                .double_value(&[])
        };
        let (single, stacked) = (spread(1), spread(128));
        // All 128 draws of the 2 images in one pass (the default stack holds 256 images).
        assert_eq!(
            eot_passes(&Noisy(tiny(), 0.3, true), &[2, 3, 2, 2], 128),
            vec![128]
        );
        assert!(
            stacked < single / 5.0,
            "128 stacked draws spread {stacked}, one draw {single}: the copies are not independent"
        );
    }
}
