//! Composed models: image-to-image stages (random transforms, purifiers, quantisation, ...) in
//! front of a classifier, with BPDA for stages whose gradient is useless or unavailable.

use tch::{Device, Tensor};

use super::Model;

/// An image-to-image stage on [0,1] images.
pub trait Stage {
    fn apply(&self, images: &Tensor) -> Tensor;
    fn is_stochastic(&self) -> bool {
        false
    }
    /// As [`Model::draws_per_sample`]: each image of a batch draws its own randomness.
    fn draws_per_sample(&self) -> bool {
        true
    }
    /// As [`Model::work_size`].
    fn work_size(&self) -> Option<usize> {
        None
    }
    fn describe(&self) -> String;
}

impl<S: Stage + ?Sized> Stage for Box<S> {
    fn apply(&self, images: &Tensor) -> Tensor {
        (**self).apply(images)
    }
    fn is_stochastic(&self) -> bool {
        (**self).is_stochastic()
    }
    fn draws_per_sample(&self) -> bool {
        (**self).draws_per_sample()
    }
    fn work_size(&self) -> Option<usize> {
        (**self).work_size()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// A differentiable stand-in for a stage's backward pass.
pub type Surrogate = Box<dyn Fn(&Tensor) -> Tensor + Send + Sync>;

/// BPDA (Athalye et al. 2018): the forward pass is the wrapped stage, the backward pass is that
/// of `approx` (identity by default): out = approx(x) + (stage(x) - approx(x)).detach().
pub struct Bpda<S> {
    pub stage: S,
    pub approx: Option<Surrogate>,
}

impl<S: Stage> Bpda<S> {
    pub fn identity(stage: S) -> Self {
        Bpda {
            stage,
            approx: None,
        }
    }
}

impl<S: Stage> Stage for Bpda<S> {
    fn apply(&self, x: &Tensor) -> Tensor {
        let exact = tch::no_grad(|| self.stage.apply(&x.detach()));
        let surrogate = match &self.approx {
            Some(f) => f(x),
            None => x.shallow_clone(),
        };
        &surrogate + (exact - surrogate.detach())
    }
    fn is_stochastic(&self) -> bool {
        self.stage.is_stochastic()
    }
    fn draws_per_sample(&self) -> bool {
        self.stage.draws_per_sample()
    }
    fn work_size(&self) -> Option<usize> {
        self.stage.work_size()
    }
    fn describe(&self) -> String {
        format!("bpda({})", self.stage.describe())
    }
}

/// Rounds pixels to `levels` grey levels: a classic non-differentiable "defence" (its gradient
/// is zero almost everywhere), useful to exercise BPDA and the gradient-masking checks.
pub struct Quantize {
    pub levels: u32,
}

impl Stage for Quantize {
    fn apply(&self, x: &Tensor) -> Tensor {
        let k = (self.levels.max(2) - 1) as f64;
        (x * k).round() / k
    }
    fn describe(&self) -> String {
        format!("quantize({})", self.levels)
    }
}

/// Stages applied in order, then a model.
pub struct Pipeline<'a> {
    pub stages: Vec<Box<dyn Stage + 'a>>,
    pub model: &'a dyn Model,
}

impl Model for Pipeline<'_> {
    fn logits(&self, images: &Tensor) -> Tensor {
        let mut x = images.shallow_clone();
        for s in &self.stages {
            x = s.apply(&x);
        }
        self.model.logits(&x)
    }
    fn num_classes(&self) -> usize {
        self.model.num_classes()
    }
    fn device(&self) -> Device {
        self.model.device()
    }
    fn is_stochastic(&self) -> bool {
        self.model.is_stochastic() || self.stages.iter().any(|s| s.is_stochastic())
    }
    fn draws_per_sample(&self) -> bool {
        self.model.draws_per_sample() && self.stages.iter().all(|s| s.draws_per_sample())
    }
    fn work_size(&self) -> Option<usize> {
        let stages = self.stages.iter().filter_map(|s| s.work_size());
        stages.chain(self.model.work_size()).max()
    }
    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.stages.iter().map(|s| s.describe()).collect();
        parts.push(self.model.describe());
        parts.join(" -> ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn bpda_keeps_the_forward_and_passes_the_gradient_through() {
        let x = Tensor::rand([2, 3, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let q = Quantize { levels: 4 };
        let exact = q.apply(&x);
        // The exact stage has no useful gradient.
        let g = Tensor::run_backward(&[exact.sum(Kind::Float)], &[&x], false, false);
        assert_eq!(g[0].abs().sum(Kind::Float).double_value(&[]), 0.0);
        let b = Bpda::identity(Quantize { levels: 4 });
        let out = b.apply(&x);
        let same = (&out - q.apply(&x.detach())).abs().max().double_value(&[]);
        assert!(same < 1e-7, "forward differs by {same}");
        let g = Tensor::run_backward(&[(&out * 3.0).sum(Kind::Float)], &[&x], false, false);
        let dev = (&g[0] - 3.0).abs().max().double_value(&[]);
        assert!(dev < 1e-6, "identity backward off by {dev}");
    }
}
