//! One AToP step (Algorithm 1 on a batch): the frozen classifier, the purifier, its optimizers
//! and weight average.

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::attacks::Norm;
use crate::attacks::grad::{GradStats, evaluate as gradient};
use crate::attacks::loss;
use crate::models::pipeline::Pipeline;
use crate::models::{Classifier, Model};
use crate::purifier::defended::{Defence, defended};
use crate::purifier::{OwnTerms, Purifier};
use crate::runtime::autocast;
use crate::train::adam::Adam;
use crate::train::ema::Ema;
use crate::train::learner::Losses;
use crate::train::purifier::{critic_step, kl_to_clean_prediction};
use crate::transforms::TransformConfig;

use super::*;

/// The fine-tuning itself: the frozen classifier, the purifier and its optimizers, and one step
/// of Algorithm 1 on a batch.
pub struct FineTuner<'a> {
    pub cfg: &'a TrainAtopConfig,
    pub f: Classifier,
    pub p: Purifier,
    pub transform: TransformConfig,
    pub opt_g: Adam,
    /// The discriminator's optimizer (None for a purifier without one).
    pub opt_d: Option<Adam>,
    /// The generator's weight average (with `ema_decay` > 0).
    pub ema: Option<Ema>,
}

impl<'a> FineTuner<'a> {
    /// Freezes `f` (no gradient into its weights; it always runs in evaluation mode).
    pub fn new(
        cfg: &'a TrainAtopConfig,
        mut f: Classifier,
        p: Purifier,
        transform: TransformConfig,
    ) -> Result<Self> {
        f.vs.freeze();
        let opt_g = Adam::new(p.weights(), cfg.generator_optimizer);
        let opt_d = p
            .critic()
            .map(|d| Adam::new(d, cfg.discriminator_optimizer));
        let ema = if cfg.ema_decay > 0.0 {
            Some(Ema::new(p.weights(), cfg.ema_decay)?)
        } else {
            None
        };
        Ok(FineTuner {
            cfg,
            f,
            p,
            transform,
            opt_g,
            opt_d,
            ema,
        })
    }

    /// Runs `f` on the generator the run exports: the weight average if there is one.
    pub fn with_exported<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.ema {
            Some(ema) => ema.with_average(self.p.weights(), f),
            None => f(),
        }
    }

    /// The defended model f(down(g(t(up(.))))) on the current generator, for images of h x w.
    pub fn defended(&self, (h, w): (i64, i64)) -> Result<Pipeline<'_>> {
        let defence = Defence {
            transform: Some(self.transform.clone()),
            ..Default::default()
        };
        defended(&self.f, Some((&self.p, &self.transform)), &defence, (h, w))
    }

    /// x' for a batch: the configured attack on f alone or on the whole defended model (its
    /// current generator, fresh transforms), last iterate.
    pub fn adversarial(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let adv = &self.cfg.adversary;
        let (steps, size, random_start) = adv.schedule();
        let whole = self.defended((x.size()[2], x.size()[3]))?;
        let (model, eot): (&dyn Model, usize) = match adv.target {
            AdversaryTarget::Classifier => (&self.f, 1),
            AdversaryTarget::Defended => (&whole, adv.eot),
        };
        let norm = Norm::Linf;
        let mut a = if random_start {
            norm.random_start(x, adv.eps)
        } else {
            x.copy()
        };
        let mut stats = GradStats::default();
        autocast(x.device(), adv.precision, || {
            for _ in 0..steps {
                let e = gradient(model, &a, y, &|z| loss::ce(z, y), eot, &mut stats);
                a = norm.project(&(&a + norm.direction(&e.grad) * size), x, adv.eps);
            }
        });
        Ok(a.detach())
    }

    /// The training batch: x' for the first `adversary.fraction` of the images, the rest clean.
    pub fn mixed(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let n = x.size()[0];
        let k = self.cfg.adversary.adversarial_count(n);
        if k >= n {
            return self.adversarial(x, y);
        }
        let adv = self.adversarial(&x.narrow(0, 0, k), &y.narrow(0, 0, k))?;
        Ok(Tensor::cat(&[adv, x.narrow(0, k, n - k)], 0))
    }

    /// One step of Algorithm 1 on clean images `x` with labels `y`: x' is made, D takes a hinge
    /// step, G a step on Eq. 9 (the CE term only from `ce_after_epochs` on). `lr_g`/`lr_d` are
    /// this step's learning rates. A step whose loss terms are not finite leaves G unchanged.
    pub fn step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        epoch: usize,
        lr: (f64, f64),
    ) -> Result<AtopLosses> {
        let cfg = self.cfg;
        let device = x.device();
        self.opt_g.set_lr(lr.0);
        if let Some(opt_d) = &mut self.opt_d {
            opt_d.set_lr(lr.1);
        }
        let x_adv = self.mixed(x, y)?;
        let p = &mut self.p;
        let transform = &self.transform;
        let pass = autocast(device, cfg.precision, || p.pass(&x_adv, transform));
        let reference = match cfg.reconstruction {
            Reconstruction::Clean => p.resolution().to_work(x),
            Reconstruction::Adversarial => pass.clean.shallow_clone(),
        };
        let zero = || Tensor::zeros([], (Kind::Float, device));
        let gan = cfg.gan_weight > 0.0;
        let d_loss = if gan {
            critic_step(p, self.opt_d.as_mut(), &pass, &reference, cfg.precision)
        } else {
            zero()
        };
        let OwnTerms {
            gan: g_gan,
            l1: g_l1,
        } = p.own_terms(&pass, &reference, gan, cfg.precision);
        // Gradients flow through the frozen classifier (eval mode, no weight gradients) into g.
        let f = &self.f;
        let logits = autocast(device, cfg.precision, || {
            f.logits(&pass.purified.to_kind(Kind::Float))
        })
        .to_kind(Kind::Float);
        let guided = epoch >= cfg.ce_after_epochs;
        let g_ce = if guided && cfg.lambda > 0.0 {
            logits.cross_entropy_for_logits(y)
        } else {
            zero()
        };
        let g_kl = if guided && cfg.kl_weight > 0.0 {
            kl_to_clean_prediction(f, x, &logits, cfg.precision)
        } else {
            zero()
        };
        let adv_acc = logits
            .argmax(-1, false)
            .eq_tensor(y)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let g_loss = &g_gan * cfg.gan_weight
            + &g_l1 * cfg.l1_weight
            + &g_ce * cfg.lambda
            + &g_kl * cfg.kl_weight;
        let losses = AtopLosses {
            d_loss: d_loss.double_value(&[]),
            g_gan: g_gan.double_value(&[]),
            g_l1: g_l1.double_value(&[]),
            g_ce: g_ce.double_value(&[]),
            g_kl: g_kl.double_value(&[]),
            adv_acc,
        };
        if losses.terms().iter().all(|(_, v)| v.is_finite()) {
            self.opt_g.zero_grad();
            g_loss.backward();
            self.opt_g.step();
            if let Some(ema) = &mut self.ema {
                ema.update(p.weights());
            }
        }
        Ok(losses)
    }
}
