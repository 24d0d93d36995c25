//! Does an accelerator compute what the CPU computes? Each step the pipeline takes (the
//! classifier's forward pass and training step, an attack, the purifier's pass and training step
//! at its working size, the gradient of the whole defended model) runs on both devices from the
//! same weights and the same inputs, in f32, and the outputs are compared; each step's cost per
//! image is timed on both. Randomness (the transform's noise and mask) is drawn once on the CPU
//! and handed to both, since the two devices' generators give different streams.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Result, bail};
use serde::Serialize;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

use crate::attacks::loss::LossKind;
use crate::attacks::norm::Norm;
use crate::attacks::pgd::Pgd;
use crate::attacks::{Attack, Budget};
use crate::models::{Classifier, Model};
use crate::purifier::{Purifier, PurifierConfig};
use crate::runtime::synchronize;
use crate::transforms::{TransformConfig, Transformed};

impl DeviceCheck {
    /// A check on `images` images whose CPU and device runs took `tc` and `td` seconds for
    /// `work` images' worth of passes; its thresholds come from `within` and `agreeing`.
    fn new(
        step: String,
        images: i64,
        compared: &str,
        detail: String,
        ((tc, td), work): ((f64, f64), i64),
    ) -> Self {
        DeviceCheck {
            step,
            images,
            compared: compared.into(),
            difference: None,
            max_difference: None,
            agreement: None,
            min_agreement: None,
            detail,
            cpu_ms_per_image: per_image(tc, work),
            device_ms_per_image: per_image(td, work),
            passed: false,
        }
    }

    /// Passes only with `difference` at most `max`.
    fn within(mut self, difference: f64, max: f64) -> Self {
        (self.difference, self.max_difference) = (Some(difference), Some(max));
        self
    }

    /// Passes only with `agreement` at least `min`.
    fn agreeing(mut self, agreement: f64, min: f64) -> Self {
        (self.agreement, self.min_agreement) = (Some(agreement), Some(min));
        self
    }
}

/// What to compare, beyond the classifier and the images.
#[derive(Debug, Clone)]
pub struct DeviceCheckSettings {
    /// The accelerator compared with the CPU.
    pub device: Device,
    /// The purifier whose steps are compared (freshly initialised from `seed`, the same
    /// weights on both devices), with its working size and transform.
    pub purifier: PurifierConfig,
    pub transform: TransformConfig,
    /// Images (the first ones of the batch) for the purifier's steps.
    pub purifier_images: i64,
    /// PGD iterations (Linf, no random start, step eps / 4) on the classifier.
    pub pgd_steps: usize,
    pub eps: f64,
    pub seed: u64,
}

/// One step on both devices: how far apart the outputs are, and what each device paid.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceCheck {
    pub step: String,
    pub images: i64,
    /// What was compared, and how `difference` is scaled.
    pub compared: String,
    /// The outputs' difference on the scale `compared` names (None where only agreement counts).
    pub difference: Option<f64>,
    pub max_difference: Option<f64>,
    /// Fraction of predictions (or successes) that agree, or a cosine similarity.
    pub agreement: Option<f64>,
    pub min_agreement: Option<f64>,
    /// Accuracies or losses on each side, in words.
    pub detail: String,
    pub cpu_ms_per_image: f64,
    pub device_ms_per_image: f64,
    pub passed: bool,
}

/// The classifier's checkpoint loaded on each device (`load` is called once per device).
pub struct OnBoth {
    pub cpu: Classifier,
    pub device: Classifier,
}

/// Runs every check; `x` (N x 3 x H x W in [0,1]) and `y` live on the CPU. With `s.device` the
/// CPU itself, every difference is zero (the tests' check of the comparison).
pub fn compare(
    classifier: OnBoth,
    x: &Tensor,
    y: &Tensor,
    s: &DeviceCheckSettings,
) -> Result<Vec<DeviceCheck>> {
    if classifier.cpu.device() != Device::Cpu || classifier.device.device() != s.device {
        bail!(
            "the classifier copies are not on the CPU and on {:?}",
            s.device
        );
    }
    crate::attacks::check_caps("the device check's PGD", s.pgd_steps, 1)?;
    let n = x.size()[0];
    if n == 0 || s.purifier_images < 1 || s.purifier_images > n {
        bail!(
            "purifier images = {}: expected between 1 and the {n} images",
            s.purifier_images
        );
    }
    let OnBoth {
        cpu: mut f_cpu,
        device: mut f_dev,
    } = classifier;
    let dev = s.device;
    let (xd, yd) = (x.to_device(dev), y.to_device(dev));
    let mut checks = Vec::new();

    // The classifier's forward pass.
    let (lc, tc) = timed(Device::Cpu, || tch::no_grad(|| f_cpu.logits(x)));
    let (ld, td) = timed(dev, || tch::no_grad(|| f_dev.logits(&xd)));
    let ld = ld.to_device(Device::Cpu);
    let same = fraction(&lc.argmax(-1, false).eq_tensor(&ld.argmax(-1, false)));
    checks.push(
        DeviceCheck::new(
            "classifier forward".to_string(),
            n,
            "logits: max |cpu - device| / max |cpu|; argmax agreement",
            format!(
                "accuracy cpu {:.2} %, device {:.2} %",
                100.0 * accuracy(&lc, y),
                100.0 * accuracy(&ld, y)
            ),
            ((tc, td), n),
        )
        .within(max_abs(&(&lc - &ld)) / max_abs(&lc), 1e-2)
        .agreeing(same, 0.99),
    );

    // PGD on the classifier (before its training step changes it).
    checks.push(pgd_check((&f_cpu, &f_dev), (x, y), (&xd, &yd), s)?);

    checks.extend(purifier_checks(&f_cpu, &f_dev, x, y, s)?);

    // SGD steps of the classifier (train-mode batch norm), same batch on both; last, since
    // they change its weights.
    let before = snapshot(&f_cpu.vs);
    let sgd_step = |f: &mut Classifier, x: &Tensor, y: &Tensor| {
        let mut opt = nn::Sgd {
            momentum: 0.9,
            ..Default::default()
        }
        .build(&f.vs, 0.05)
        .expect("an SGD optimizer over the classifier's variables");
        let loss = f.forward_t(x, true).cross_entropy_for_logits(y);
        opt.backward_step(&loss);
        loss.double_value(&[])
    };
    let (loss_c, tc) = timed(Device::Cpu, || sgd_step(&mut f_cpu, x, y));
    let (loss_d, td) = timed(dev, || sgd_step(&mut f_dev, &xd, &yd));
    checks.push(
        DeviceCheck::new(
            "classifier training step (SGD)".to_string(),
            n,
            "weights after two steps: ||cpu - device|| / ||cpu update||",
            format!("loss cpu {loss_c:.5}, device {loss_d:.5}"),
            ((tc, td), n),
        )
        .within(weight_gap(&before, &f_cpu.vs, &f_dev.vs), 5e-2),
    );
    for c in &mut checks {
        c.passed = c
            .difference
            .zip(c.max_difference)
            .is_none_or(|(d, m)| d <= m)
            && c.agreement.zip(c.min_agreement).is_none_or(|(a, m)| a >= m);
    }
    Ok(checks)
}

/// PGD on the classifier on both devices, from the same images: does each image's attack
/// succeed on both or on neither?
fn pgd_check(
    (f_cpu, f_dev): (&Classifier, &Classifier),
    (x, y): (&Tensor, &Tensor),
    (xd, yd): (&Tensor, &Tensor),
    s: &DeviceCheckSettings,
) -> Result<DeviceCheck> {
    let (n, dev) = (x.size()[0], s.device);
    let pgd = Pgd {
        budget: Budget::new(Norm::Linf, s.eps)?,
        steps: s.pgd_steps,
        step_size: s.eps / 4.0,
        random_start: false,
        restarts: 1,
        loss: LossKind::Ce,
        target: None,
        eot: 1,
        selection: Default::default(),
    };
    let (ac, tc) = timed(Device::Cpu, || pgd.run(f_cpu, x, y, s.seed));
    let (ad, td) = timed(dev, || pgd.run(f_dev, xd, yd, s.seed));
    let (ac, ad) = (ac?.x_adv, ad?.x_adv.to_device(Device::Cpu));
    let broken_c = tch::no_grad(|| f_cpu.logits(&ac))
        .argmax(-1, false)
        .ne_tensor(y);
    let broken_d = tch::no_grad(|| f_dev.logits(&ad.to_device(dev)))
        .argmax(-1, false)
        .to_device(Device::Cpu)
        .ne_tensor(y);
    let pixels = fraction(&(&ac - &ad).abs().le(1e-4));
    Ok(DeviceCheck::new(
        format!("PGD-{} on the classifier", s.pgd_steps),
        n,
        "per-image attack success agreement",
        format!(
            "robust accuracy cpu {:.2} %, device {:.2} %; {:.2} % of adversarial pixels equal",
            100.0 * (1.0 - fraction(&broken_c)),
            100.0 * (1.0 - fraction(&broken_d)),
            100.0 * pixels
        ),
        ((tc, td), n * s.pgd_steps as i64),
    )
    .agreeing(fraction(&broken_c.eq_tensor(&broken_d)), 0.97))
}

fn purifier_checks(
    f_cpu: &Classifier,
    f_dev: &Classifier,
    x: &Tensor,
    y: &Tensor,
    s: &DeviceCheckSettings,
) -> Result<Vec<DeviceCheck>> {
    let dev = s.device;
    let k = s.purifier_images;
    let (h, w) = (x.size()[2], x.size()[3]);
    let x = x.narrow(0, 0, k);
    let y = y.narrow(0, 0, k);
    tch::manual_seed(s.seed as i64);
    s.purifier.check_images(h, w, &s.transform)?;
    let mut p_cpu = Purifier::new(s.purifier.clone(), Device::Cpu)?;
    let mut p_dev = Purifier::new(s.purifier.clone(), dev)?;
    p_dev.copy_from(&p_cpu)?;
    let resolution = s.purifier.resolution();
    let side = resolution.work_dims(h, w).0;
    // One draw of the transform at the working size, on the CPU, for both devices.
    let clean = resolution.to_work(&x);
    let drawn = s.transform.sample(&clean);
    if drawn.masks.len() != 1 {
        bail!(
            "the device check draws one mask (RT1, RT2, noise or none), not {}",
            s.transform.describe()
        );
    }
    let noise = &drawn.noisy - &clean;
    let mask = drawn.masks[0].shallow_clone();
    let mut checks = Vec::new();

    // The drawn transform on device `d`.
    let on = |d: Device| Transformed {
        noisy: drawn.noisy.to_device(d),
        masks: vec![mask.to_device(d)],
        hidden: drawn.hidden,
    };
    // The purifier's network at the working size.
    let pass = |p: &Purifier, d: Device| tch::no_grad(|| p.on_drawn(&on(d)));
    let (oc, tc) = timed(Device::Cpu, || pass(&p_cpu, Device::Cpu));
    let (od, td) = timed(dev, || pass(&p_dev, dev));
    let od = od.to_device(Device::Cpu);
    checks.push(
        DeviceCheck::new(
            format!("purifier forward at {side} px"),
            k,
            "purified output at the working size: max |cpu - device| / max |cpu|",
            s.purifier.describe(),
            ((tc, td), k),
        )
        .within(max_abs(&(&oc - &od)) / max_abs(&oc), 1e-2),
    );

    // The whole defended model's input gradient, f(down(g(t(up(x))))), with the drawn noise
    // and mask: what a whole-model attack step computes.
    let grad = |p: &Purifier, f: &Classifier, d: Device| {
        let xi = x.to_device(d).set_requires_grad(true);
        let up = resolution.to_work(&xi);
        let t = Transformed {
            noisy: (&up + noise.to_device(d)).clamp(0.0, 1.0),
            masks: vec![mask.to_device(d)],
            hidden: drawn.hidden,
        };
        let purified = resolution.to_image(&p.on_drawn(&t), h, w);
        let loss = f
            .logits(&purified)
            .cross_entropy_for_logits(&y.to_device(d));
        Tensor::run_backward(&[loss], &[&xi], false, false)[0].to_device(Device::Cpu)
    };
    let (gc, tc) = timed(Device::Cpu, || grad(&p_cpu, f_cpu, Device::Cpu));
    let (gd, td) = timed(dev, || grad(&p_dev, f_dev, dev));
    let cosine = (&gc * &gd).sum(Kind::Double).double_value(&[])
        / (gc.norm().double_value(&[]) * gd.norm().double_value(&[])).max(f64::MIN_POSITIVE);
    checks.push(
        DeviceCheck::new(
            format!("whole-model input gradient at {side} px"),
            k,
            "cosine similarity of the gradients w.r.t. the images",
            format!(
                "{:.2} % of gradient signs equal",
                100.0 * fraction(&gc.sign().eq_tensor(&gd.sign()))
            ),
            ((tc, td), k),
        )
        .agreeing(cosine, 0.99),
    );

    // Training steps of the purifying network (L1 of the purified output to the clean image,
    // Adam: the reconstruction part of the purifier's and AToP's losses), one untimed and one
    // timed.
    let before = snapshot(p_cpu.weights());
    let step = |p: &mut Purifier, d: Device| {
        let mut opt = nn::Adam {
            beta1: 0.5,
            ..Default::default()
        }
        .build(p.weights(), 1e-4)
        .expect("an Adam optimizer over the purifier's variables");
        let loss = (p.on_drawn(&on(d)) - clean.to_device(d))
            .abs()
            .mean(Kind::Float);
        opt.backward_step(&loss);
        loss.double_value(&[])
    };
    let (loss_c, tc) = timed(Device::Cpu, || step(&mut p_cpu, Device::Cpu));
    let (loss_d, td) = timed(dev, || step(&mut p_dev, dev));
    checks.push(
        DeviceCheck::new(
            format!("purifier training step at {side} px (L1, Adam)"),
            k,
            "purifier weights after two steps: ||cpu - device|| / ||cpu update||",
            format!("loss cpu {loss_c:.5}, device {loss_d:.5}"),
            ((tc, td), k),
        )
        .within(weight_gap(&before, p_cpu.weights(), p_dev.weights()), 5e-2),
    );
    Ok(checks)
}

/// The result of `f` and its wall-clock seconds (CUDA synchronised), after one untimed call:
/// the first call on a device pays for kernel selection and allocation.
fn timed<T>(device: Device, mut f: impl FnMut() -> T) -> (T, f64) {
    drop(f());
    synchronize(device);
    let t = Instant::now();
    let out = f();
    synchronize(device);
    (out, t.elapsed().as_secs_f64())
}

fn per_image(secs: f64, images: i64) -> f64 {
    1e3 * secs / images.max(1) as f64
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn fraction(mask: &Tensor) -> f64 {
    mask.to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

fn accuracy(logits: &Tensor, y: &Tensor) -> f64 {
    fraction(&logits.argmax(-1, false).eq_tensor(y))
}

fn snapshot(vs: &nn::VarStore) -> HashMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().copy()))
        .collect()
}

/// ||cpu - device|| / ||cpu - before|| over every variable: how far apart the two devices'
/// weights are after one step, measured against how far that step moved them. A norm rather
/// than a maximum, since Adam's first step moves every weight by about lr whatever the size of
/// its gradient, so a weight whose gradient is rounding noise may move either way.
fn weight_gap(before: &HashMap<String, Tensor>, cpu: &nn::VarStore, dev: &nn::VarStore) -> f64 {
    let dev = dev.variables();
    let (mut gap, mut update) = (0.0, 0.0);
    for (name, c) in cpu.variables() {
        let d = dev[&name].to_device(Device::Cpu);
        gap += (&c - &d).square().sum(Kind::Double).double_value(&[]);
        update += (&c - &before[&name])
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
    }
    (gap / update.max(f64::MIN_POSITIVE)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{ModelSpec, dataset_normalisation};

    /// The CPU against itself: the same weights and inputs must give differences of zero and
    /// full agreement in every step (up to rounding in the gradient's cosine), which checks that both sides really get the same weights,
    /// inputs and transform draw, and that the scales are computed as documented.
    #[test]
    fn the_cpu_against_itself_agrees_exactly_in_every_step() {
        let (mean, std) = dataset_normalisation(crate::data::DatasetKind::Cifar10);
        let spec = ModelSpec::new("airnet-32-64-128".parse().unwrap(), 10, mean, std).unwrap();
        let cpu = Classifier::new(spec.clone(), Device::Cpu);
        let mut other = Classifier::new(spec, Device::Cpu);
        other.vs.copy(&cpu.vs).unwrap();
        let x = Tensor::linspace(0.0, 1.0, 8 * 3 * 32 * 32, (Kind::Float, Device::Cpu))
            .view([8, 3, 32, 32])
            .remainder(0.37)
            * 2.5;
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
        // The demo purifier (presets/purifier-demo.toml: RT2, width 8), at twice the image size.
        let purifier = PurifierConfig::Gan(crate::purifier::GanConfig {
            width: 8,
            disc_width: 16,
            work_size: Some(64),
            ..crate::purifier::GanConfig::default()
        });
        let s = DeviceCheckSettings {
            device: Device::Cpu,
            purifier,
            transform: crate::transforms::TransformConfig::default(),
            purifier_images: 2,
            pgd_steps: 2,
            eps: 8.0 / 255.0,
            seed: 3,
        };
        let checks = compare(OnBoth { cpu, device: other }, &x, &y, &s).unwrap();
        assert_eq!(checks.len(), 6);
        for c in &checks {
            assert!(c.passed, "{c:?}");
            if let Some(d) = c.difference {
                assert_eq!(d, 0.0, "{c:?}");
            }
            // (the gradient's cosine: the CPU's backward passes are not bit-reproducible)
            assert!(c.agreement.is_none_or(|a| a > 1.0 - 1e-6), "{c:?}");
            assert!(c.cpu_ms_per_image > 0.0 && c.device_ms_per_image > 0.0);
        }
        assert!(checks.iter().any(|c| c.step == "purifier forward at 64 px"));
        // A different weight on one side must show: the comparison is not vacuous.
        let cpu = Classifier::new(
            ModelSpec::new("airnet-32-64-128".parse().unwrap(), 10, mean, std).unwrap(),
            Device::Cpu,
        );
        let other = Classifier::new(cpu.spec.clone(), Device::Cpu);
        let checks = compare(OnBoth { cpu, device: other }, &x, &y, &s).unwrap();
        assert!(!checks[0].passed, "{:?}", checks[0]);
    }
}
