//! `atop train atop`: AToP fine-tuning (Lin et al. 2024, Algorithm 1, Eq. 9). A pre-trained
//! purifier g is trained through a frozen classifier f on adversarial inputs:
//!
//!   L_g = L_df(x') + lambda * CE(y, f(g(t(x')))),   L_df = -gan * mean D(x2') + |r - x1'| + |r - x2'|
//!
//! with x' = x + delta adversarial and r the reconstruction target (the clean image, or x' as in
//! the authors' notebooks), at the purifier's working size. D is updated every step with the
//! hinge loss; the generator's GAN term sees the live x2' (the released code detached it). How
//! x' is made is a setting: FGSM or PGD-k against f alone (the authors' code) or against the
//! whole defended model f(g(t(.))) with exact gradients and EOT (the paper's equation).
//!
//! After every epoch, on a fixed seeded subset of test images: the defended model's clean
//! accuracy, its robust accuracy under a fast whole-model attack (PGD with EOT, exact gradients)
//! and under the classifier-only transfer attack (PGD on f alone, then the defended model),
//! labelled as such; `curves.png` plots them.

mod config;
mod tuner;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::learner::{EpochSummary, Fitted, RunFolder, Step, Task};
use super::purifier::{restore_state, save_state};
use super::runlog;
use super::schedule::lr_at;
use super::setup::{self, EvalImages};
use crate::attacks::grad::{GradStats, evaluate as gradient};
use crate::attacks::loss;
use crate::attacks::sweep::one_draw_cascade;
use crate::attacks::{AttackName, AttackSettings, Budget, Norm};
use crate::data::loader::{EpochIter, Loader};
use crate::data::{ImageSet, Split};
use crate::figures::{grid, plot};
use crate::models::accuracy::count_correct;
use crate::models::checkpoint;
use crate::models::{Classifier, Model};
use crate::purifier::defended::{Defence, defended};
use crate::purifier::{self, Purifier, PurifierSidecar};
use crate::runtime::{Precision, autocast};
use crate::transforms::TransformConfig;

pub use config::*;
pub use tuner::FineTuner;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AtopEpoch {
    pub epoch: usize,
    pub lr: f64,
    /// Mean training terms: discriminator hinge loss, generator GAN, L1, CE and KL terms, and
    /// the defended model's accuracy on the training x'.
    pub d_loss: f64,
    pub g_gan: f64,
    pub g_l1: f64,
    pub g_ce: f64,
    /// Absent from runs written before the KL term existed.
    #[serde(default)]
    pub g_kl: f64,
    pub train_adv_acc: f64,
    /// On the evaluation subset: the classifier alone on clean images, the defended model on
    /// clean images, under the whole-model attack, and under the classifier-only transfer attack.
    pub clean_acc: f64,
    pub defended_clean_acc: f64,
    pub robust_acc: f64,
    pub transfer_acc: f64,
    /// With a weight average (`ema_decay`), the fields above measure the averaged generator
    /// (the one the checkpoint exports) and these the live one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Accuracies>,
    pub img_per_s: f64,
    pub seconds: f64,
}

/// With a weight average: the live generator's weights and the average's update count, beside
/// the checkpoint's (averaged) `generator.safetensors`. Naming this file as a purifier
/// (`--purifier RUN/checkpoints/epoch-N/generator-live.safetensors`) loads the live weights.
const LIVE_GENERATOR: &str = "generator-live.safetensors";

/// The per-epoch evaluation of one generator.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Accuracies {
    pub defended_clean_acc: f64,
    pub robust_acc: f64,
    pub transfer_acc: f64,
}

impl runlog::EpochRecord for AtopEpoch {
    fn epoch(&self) -> usize {
        self.epoch
    }
}

#[derive(Debug, Serialize)]
pub struct AtopSummary {
    #[serde(flatten)]
    pub fitted: Fitted<AtopEpoch>,
    pub adversary: String,
    pub evaluation: String,
}

pub fn saved_config(run: &Path) -> Result<TrainAtopConfig> {
    runlog::saved_config(run, "AToP")
}

pub fn default_out(cfg: &TrainAtopConfig) -> PathBuf {
    let name = |p: &Option<PathBuf>| {
        p.as_ref()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    PathBuf::from("runs").join(format!(
        "atop-{}-{}-{:?}-lambda{}",
        name(&cfg.purifier),
        name(&cfg.classifier),
        cfg.adversary.attack,
        cfg.lambda
    ))
}

crate::losses! {
    /// An AToP step.
    pub struct AtopLosses {
        d_loss,
        g_gan,
        g_l1,
        g_ce,
        /// Absent from runs written before the KL term existed.
        #[serde(default)]
        g_kl,
        adv_acc,
    }
}

/// Fine-tunes into `run`; with `resume`, continues from the run's latest checkpoint. Every
/// input is checked before the first step.
pub fn train(
    cfg: &TrainAtopConfig,
    run: &Path,
    device: Device,
    resume: bool,
) -> Result<AtopSummary> {
    cfg.validate()?;
    let folder = RunFolder::open(run, resume)?;
    let Inputs {
        cfg,
        f,
        p,
        p_sidecar,
        train_set,
        test_set,
        transform,
        checkpoints,
    } = load_inputs(cfg, device)?;
    let (cdir, pdir) = &checkpoints;
    let run_inputs = setup::inputs(
        &train_set,
        &test_set,
        &[("classifier", cdir.as_path()), ("purifier", pdir.as_path())],
    )?;

    let eval = setup::eval_images(&test_set, cfg.eval.subset, cfg.seed, device)?;
    // Measured, not assumed: the training attack must get gradients from its model.
    check_adversary(&f, &p, &transform, &cfg.adversary, &eval)?;

    let loader = setup::loader(
        Arc::new(train_set),
        cfg.batch_size,
        setup::flips(cfg.flip),
        cfg.seed,
    )?;
    let clean_acc = count_correct(
        &f,
        &eval.x,
        &eval.y,
        cfg.eval.batch_size,
        device,
        Precision::F32,
    ) as f64
        / eval.indices.len().max(1) as f64;
    let mut task = AtopTask {
        tuner: FineTuner::new(&cfg, f, p, transform)?,
        device,
        sidecar: p_sidecar,
        loader,
        batches: None,
        eval,
        clean_acc,
        lr: 0.0,
    };
    let fitted = folder.fit(&cfg, &run_inputs, &mut task)?;
    Ok(AtopSummary {
        fitted,
        adversary: cfg.adversary.describe(),
        evaluation: eval_description(&cfg.eval),
    })
}

/// A run's inputs, loaded and checked against each other, with the effective settings (every
/// default resolved): what the run records.
struct Inputs {
    cfg: TrainAtopConfig,
    f: Classifier,
    p: Purifier,
    p_sidecar: PurifierSidecar,
    train_set: ImageSet,
    test_set: ImageSet,
    transform: TransformConfig,
    /// The classifier's and the start purifier's checkpoint folders.
    checkpoints: (PathBuf, PathBuf),
}

/// The classifier, the (widened) pre-trained purifier, the data and the transform of `cfg`:
/// each refused by name where it does not fit the others.
fn load_inputs(cfg: &TrainAtopConfig, device: Device) -> Result<Inputs> {
    let (classifier_path, purifier_path) = (
        cfg.classifier.clone().unwrap_or_default(),
        cfg.purifier.clone().unwrap_or_default(),
    );
    let (f, f_sidecar) = checkpoint::load(&classifier_path, device)?;
    let cdir = checkpoint::resolve(&classifier_path)?;
    let pdir = purifier::resolve(&purifier_path)?;
    let (p, mut p_sidecar) = purifier::load(&purifier_path, device)?;
    if p_sidecar.epoch.unwrap_or(0) == 0 {
        bail!(
            "{}: not a pre-trained purifier (its description records no training epoch): pre-train it with atop train purifier first",
            pdir.display()
        );
    }
    // Widened before anything measures it; the checkpoints then describe the wider generator.
    let p = match cfg.widen {
        Some(w) => p.widened(w).with_context(|| pdir.display().to_string())?,
        None => p,
    };
    p_sidecar.purifier = p.config();
    let data = match &cfg.data {
        Some(d) => d.clone(),
        None => p_sidecar.data_config().with_context(|| {
            format!(
                "{} does not say which data it was trained on: set data in the config",
                pdir.display()
            )
        })?,
    };
    // The classifier and the purifier must serve the same data.
    if let (Some(a), Some(b)) = (&f_sidecar.dataset, &p_sidecar.dataset)
        && a != b
    {
        bail!(
            "the classifier {} was trained for {a}, the purifier {} for {b}",
            classifier_path.display(),
            pdir.display()
        );
    }
    let train_set = data.load(Split::Train)?;
    let test_set = data.load(Split::Test)?;
    if train_set.num_classes() != f.spec.num_classes {
        bail!(
            "the classifier {} has {} classes, {} has {}",
            classifier_path.display(),
            f.spec.num_classes,
            train_set.name,
            train_set.num_classes()
        );
    }
    let side = train_set.height as i64;
    if let Some(s) = p_sidecar.image_size
        && s != side
    {
        bail!(
            "the purifier {} was trained on {s} px images, the data here is {side} px",
            pdir.display()
        );
    }
    let train_set = setup::subset(train_set, cfg.train_subset, cfg.seed)?;
    let transform = cfg
        .transform
        .clone()
        .unwrap_or_else(|| p_sidecar.transform.clone());
    p.config().check_images(side, side, &transform)?;
    p.config().check_gan_weight("gan_weight", cfg.gan_weight)?;
    // The effective settings, with every default resolved, are what the run records.
    let mut cfg = cfg.clone();
    cfg.classifier = Some(crate::folder::absolute(&classifier_path));
    cfg.purifier = Some(crate::folder::absolute(&purifier_path));
    cfg.data = Some(data.absolute());
    cfg.transform = Some(transform.clone());
    Ok(Inputs {
        cfg,
        f,
        p,
        p_sidecar,
        train_set,
        test_set,
        transform,
        checkpoints: (cdir, pdir),
    })
}

fn eval_description(e: &AtopEvalConfig) -> String {
    format!(
        "{} seeded test images; whole-model PGD-{} (step eps/4, random start) x EOT {} with exact gradients at Linf {:.5}, then selective EOT at the same budget on the points PGD left (the iterate that fooled most of its draws; each image judged on one fresh seeded draw); transfer: the same PGD against the classifier alone, scored on the defended model; robust = the defended model right on the clean and the attacked images",
        e.subset, e.steps, e.eot, e.eps
    )
}

/// One gradient evaluation of the training attack on a few evaluation images: an error if the
/// gradients are zero or not finite (the attack could not move x').
fn check_adversary(
    f: &Classifier,
    p: &Purifier,
    transform: &TransformConfig,
    adv: &AdversaryConfig,
    eval: &EvalImages,
) -> Result<()> {
    let n = eval.x.size()[0].min(4);
    let (x, y) = (eval.x.narrow(0, 0, n), eval.y.narrow(0, 0, n));
    let defence = Defence {
        transform: Some(transform.clone()),
        ..Default::default()
    };
    let (h, w) = (x.size()[2], x.size()[3]);
    let whole = defended(f, Some((p, transform)), &defence, (h, w))?;
    let model: &dyn Model = match adv.target {
        AdversaryTarget::Classifier => f,
        AdversaryTarget::Defended => &whole,
    };
    let mut stats = GradStats::default();
    autocast(x.device(), adv.precision, || {
        gradient(model, &x, &y, &|z| loss::ce(z, &y), 1, &mut stats)
    });
    if stats.zero + stats.non_finite >= stats.evaluations.max(1) {
        bail!(
            "the training attack ({}) cannot run on its model: {} of {} input gradients are zero or not finite",
            adv.describe(),
            stats.zero + stats.non_finite,
            stats.evaluations
        );
    }
    Ok(())
}

struct AtopTask<'a> {
    tuner: FineTuner<'a>,
    device: Device,
    /// The pre-trained purifier's description (kept, with the fine-tuning recorded).
    sidecar: PurifierSidecar,
    loader: Loader,
    batches: Option<EpochIter>,
    eval: EvalImages,
    clean_acc: f64,
    lr: f64,
}

impl AtopTask<'_> {
    /// Defended clean accuracy, whole-model robust accuracy and transfer accuracy on the
    /// evaluation subset, with seeded randomness (the same draws every epoch). As in `atop
    /// attack`, a point counts as robust only if the defended model also classified its clean
    /// image correctly.
    fn evaluate(&self) -> Result<Accuracies> {
        let t = &self.tuner;
        let e = &t.cfg.eval;
        let (x, y) = (&self.eval.x, &self.eval.y);
        let whole = t.defended((x.size()[2], x.size()[3]))?;
        let mut settings = AttackSettings::new(Budget::new(Norm::Linf, e.eps)?);
        settings.steps = Some(e.steps);
        let run = |model: &dyn Model, eot: usize, attacks: &[AttackName]| {
            let mut settings = settings.clone();
            settings.eot = eot;
            let attacks: Vec<_> = attacks.iter().map(|&a| (a, settings.clone())).collect();
            one_draw_cascade(model, &attacks, (x, y), e.batch_size, t.cfg.seed)
        };
        let whole_report = run(&whole, e.eot, &[AttackName::Pgd, AttackName::SelectiveEot])?;
        let transfer = run(&t.f, 1, &[AttackName::Pgd])?;
        // The transferred images on the defended model, where it classified the clean image
        // correctly (one draw each, seeded).
        tch::manual_seed(t.cfg.seed as i64 ^ 0x5eed);
        // (the sweep hands its images back on the CPU)
        let on_adv = tch::no_grad(|| whole.logits(&transfer.x_adv.to_device(y.device())))
            .argmax(-1, false)
            .eq_tensor(y);
        let on_adv = Vec::<bool>::try_from(on_adv.to_device(Device::Cpu))?;
        let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu))?;
        let kept = (whole_report.clean_pred.iter().zip(&labels))
            .zip(&on_adv)
            .filter(|((p, l), ok)| p == l && **ok)
            .count();
        let share = |v: &[bool]| v.iter().filter(|&&b| b).count() as f64 / v.len().max(1) as f64;
        let clean_right: Vec<bool> = whole_report
            .clean_pred
            .iter()
            .zip(&labels)
            .map(|(p, l)| p == l)
            .collect();
        let n = self.eval.indices.len().max(1) as f64;
        Ok(Accuracies {
            defended_clean_acc: share(&clean_right),
            robust_acc: share(&whole_report.robust),
            transfer_acc: kept as f64 / n,
        })
    }

    /// Rows: clean, adversarial (training attack), transformed, purified, at the classifier's
    /// resolution, for 8 evaluation images.
    fn write_samples(&self, path: &Path) -> Result<()> {
        let n = self.eval.x.size()[0];
        let k = n.min(8);
        let pick: Vec<i64> = (0..k).map(|i| i * n / k).collect();
        let idx = Tensor::from_slice(&pick).to_device(self.device);
        let (x, y) = (
            self.eval.x.index_select(0, &idx),
            self.eval.y.index_select(0, &idx),
        );
        let adv = self.tuner.adversarial(&x, &y)?;
        let pass = tch::no_grad(|| self.tuner.p.pass(&adv, &self.tuner.transform));
        grid::save_tensor_rows(
            &[
                ("clean", x.shallow_clone()),
                ("adversarial", adv.shallow_clone()),
                ("transformed", pass.shown()),
                ("purified", pass.purified.shallow_clone()),
            ],
            path,
        )
    }
}

impl Task for AtopTask<'_> {
    type Losses = AtopLosses;
    type Record = AtopEpoch;

    fn epochs(&self) -> usize {
        self.tuner.cfg.epochs
    }

    fn steps_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch()
    }

    fn begin_epoch(&mut self, epoch: usize) {
        // Transforms and attack starts draw from libtorch's generator: seeded per epoch, so a
        // resumed run draws what an uninterrupted one does.
        tch::manual_seed(
            (self.tuner.cfg.seed as i64)
                .wrapping_mul(1_000_033)
                .wrapping_add(epoch as i64),
        );
        self.batches = Some(self.loader.epoch(epoch as u64));
    }

    fn step(&mut self, step: Step) -> Result<(AtopLosses, usize)> {
        let cfg = self.tuner.cfg;
        let batch = self
            .batches
            .as_mut()
            .and_then(|b| b.next())
            .context("the batch iterator ended early")?;
        let lr = |peak: f64| {
            lr_at(
                cfg.schedule,
                peak,
                step.global,
                step.total,
                cfg.warmup_steps,
            )
        };
        self.lr = lr(cfg.generator_optimizer.lr);
        let x = batch.images.to_device(self.device);
        let y = batch.labels.to_device(self.device);
        let losses = self.tuner.step(
            &x,
            &y,
            step.epoch,
            (self.lr, lr(cfg.discriminator_optimizer.lr)),
        )?;
        Ok((losses, batch.indices.len()))
    }

    fn after_step(&mut self, run: &Path, step: Step) -> Result<()> {
        let every = self.tuner.cfg.sample_every;
        if every > 0 && (step.global + 1).is_multiple_of(every) {
            self.write_samples(&run.join(format!("samples/step-{:07}.png", step.global + 1)))?;
        }
        Ok(())
    }

    fn progress(&self, m: &AtopLosses) -> String {
        format!(
            "L1 {:.3} CE {:.3} acc(x') {:.1}%",
            m.g_l1,
            m.g_ce,
            100.0 * m.adv_acc
        )
    }

    fn end_epoch(&mut self, run: &Path, e: EpochSummary<AtopLosses>) -> Result<AtopEpoch> {
        let t = &self.tuner;
        t.with_exported(|| {
            self.write_samples(&run.join(format!("samples/epoch-{:04}.png", e.epoch)))
        })?;
        let exported = t.with_exported(|| self.evaluate())?;
        let live = match t.ema {
            Some(_) => Some(self.evaluate()?),
            None => None,
        };
        let l = e.losses;
        Ok(AtopEpoch {
            epoch: e.epoch,
            lr: self.lr,
            d_loss: l.d_loss,
            g_gan: l.g_gan,
            g_l1: l.g_l1,
            g_ce: l.g_ce,
            g_kl: l.g_kl,
            train_adv_acc: l.adv_acc,
            clean_acc: self.clean_acc,
            defended_clean_acc: exported.defended_clean_acc,
            robust_acc: exported.robust_acc,
            transfer_acc: exported.transfer_acc,
            live,
            img_per_s: e.img_per_s,
            seconds: e.started.elapsed().as_secs_f64(),
        })
    }

    fn describe(&self, m: &AtopEpoch) -> String {
        let (which, live) = match &m.live {
            Some(a) => (
                " (weight average)",
                format!(
                    " | live weights: clean {:.1}%, whole-model PGD {:.1}%, transfer {:.1}%",
                    100.0 * a.defended_clean_acc,
                    100.0 * a.robust_acc,
                    100.0 * a.transfer_acc
                ),
            ),
            None => ("", String::new()),
        };
        format!(
            "D {:.3} G gan {:.3} L1 {:.3} CE {:.3} KL {:.3} acc(x') {:.1}% | defended{which}: clean {:.1}%, whole-model PGD {:.1}%, transfer {:.1}% (classifier alone {:.1}%){live} | {:.1} img/s, {:.0} s",
            m.d_loss,
            m.g_gan,
            m.g_l1,
            m.g_ce,
            m.g_kl,
            100.0 * m.train_adv_acc,
            100.0 * m.defended_clean_acc,
            100.0 * m.robust_acc,
            100.0 * m.transfer_acc,
            100.0 * m.clean_acc,
            m.img_per_s,
            m.seconds
        )
    }

    fn save(&self, dir: &Path, epoch: usize, step: usize) -> Result<()> {
        let t = &self.tuner;
        let mut sidecar = self.sidecar.clone();
        sidecar.transform = t.transform.clone();
        sidecar.epoch = Some(sidecar.epoch.unwrap_or(0) + epoch);
        sidecar.step = Some(sidecar.step.unwrap_or(0) + step);
        sidecar.fine_tuning = Some(serde_json::to_value(t.cfg)?);
        // The average is the checkpoint's generator (what --purifier RUN loads); the live
        // weights go beside it for resuming.
        t.with_exported(|| save_state(dir, &t.p, &sidecar, &t.opt_g, t.opt_d.as_ref()))?;
        if let Some(ema) = &t.ema {
            crate::io::write_safetensors(
                &dir.join(LIVE_GENERATOR),
                &ema.live_state(t.p.weights()),
            )?;
        }
        Ok(())
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        let t = &mut self.tuner;
        restore_state(dir, &mut t.p, &mut t.opt_g, t.opt_d.as_mut())?;
        if let Some(ema) = &mut t.ema {
            ema.restore(t.p.weights(), &dir.join(LIVE_GENERATOR))?;
        }
        Ok(())
    }

    fn finish(&mut self, run: &Path) -> Result<()> {
        write_curves(run)
    }

    fn divergence_hint(&self) -> &'static str {
        "Lower the learning rates, lambda or the gan_weight."
    }
}

/// `curves.png`: the defended model's clean, whole-model robust and transfer accuracy per epoch.
pub fn write_curves(run: &Path) -> Result<()> {
    let m: Vec<AtopEpoch> = runlog::read(run)?;
    let series = |name: &str, f: &dyn Fn(&AtopEpoch) -> f64| plot::Series {
        name: name.into(),
        points: m.iter().map(|e| (e.epoch as f64, 100.0 * f(e))).collect(),
    };
    let chart = plot::line_chart(
        "accuracy (%)",
        "epoch",
        &[
            series("defended, clean", &|e| e.defended_clean_acc),
            series("defended, whole-model PGD+EOT", &|e| e.robust_acc),
            series("defended, transfer (classifier-only PGD)", &|e| {
                e.transfer_acc
            }),
        ],
    );
    grid::save_png(&chart, &run.join("curves.png"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn every_preset_parses_and_validates() {
        for (name, _) in PRESETS {
            let mut cfg = TrainAtopConfig::preset(name).unwrap();
            cfg.classifier = Some("c".into());
            cfg.purifier = Some("p".into());
            cfg.validate()
                .unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
    }

    fn snapshot(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// How many of the variables in `before` (a [`snapshot`]) differ in `vs` now.
    fn moved(before: &[(String, Tensor)], vs: &tch::nn::VarStore) -> usize {
        before
            .iter()
            .zip(snapshot(vs).iter())
            .filter(|((_, a), (_, b))| !a.equal(b))
            .count()
    }

    /// A small random classifier and generator, for steps in unit tests.
    fn tiny_models() -> (Classifier, Purifier) {
        use crate::models::{Arch, ModelSpec, dataset_normalisation};
        use crate::purifier::GanConfig;
        let (mean, std) = dataset_normalisation(crate::data::DatasetKind::Cifar10);
        let arch: Arch = "wrn-10-1".parse().unwrap();
        let f = Classifier::new(ModelSpec::new(arch, 10, mean, std).unwrap(), Device::Cpu);
        let p = Purifier::new(
            GanConfig {
                width: 4,
                disc_width: 4,
                attention: false,
                skips: true,
                ..Default::default()
            }
            .into(),
            Device::Cpu,
        )
        .unwrap();
        (f, p)
    }

    /// The authors' training attack: FGSM on the classifier alone.
    fn classifier_fgsm() -> AdversaryConfig {
        AdversaryConfig {
            attack: AdversaryKind::Fgsm,
            target: AdversaryTarget::Classifier,
            ..Default::default()
        }
    }

    /// 8 random CIFAR-sized images and labels.
    fn random_batch() -> (Tensor, Tensor) {
        (
            Tensor::rand([8, 3, 32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randint(10, [8], (Kind::Int64, Device::Cpu)),
        )
    }

    #[test]
    fn a_mixed_batch_attacks_its_share_and_keeps_the_rest_clean() {
        tch::manual_seed(3);
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.adversary = AdversaryConfig {
            attack: AdversaryKind::Pgd,
            target: AdversaryTarget::Defended,
            steps: 1,
            fraction: 0.3,
            ..Default::default()
        };
        assert_eq!(cfg.adversary.adversarial_count(10), 3);
        assert_eq!(cfg.adversary.adversarial_count(1), 1);
        assert!(cfg.adversary.describe().contains("30 % of each batch"));
        let (f, p) = tiny_models();
        let tuner = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
        let x = Tensor::rand([10, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [10], (Kind::Int64, Device::Cpu));
        let mixed = tuner.mixed(&x, &y).unwrap();
        assert_eq!(mixed.size(), x.size());
        assert!(
            mixed.narrow(0, 3, 7).equal(&x.narrow(0, 3, 7)),
            "the clean share changed"
        );
        let d = (mixed.narrow(0, 0, 3) - x.narrow(0, 0, 3)).abs();
        let per_image = d.amax([1, 2, 3], false);
        for i in 0..3 {
            let m = per_image.double_value(&[i]);
            assert!(m > 0.0 && m <= cfg.adversary.eps + 1e-6, "image {i}: {m}");
        }
    }

    #[test]
    fn the_classifier_stays_frozen_and_its_gradient_reaches_the_purifier() {
        tch::manual_seed(7);
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        // Only the CE term through f: if g changes, the gradient went through the classifier.
        cfg.l1_weight = 0.0;
        cfg.gan_weight = 0.0;
        cfg.lambda = 1.0;
        cfg.adversary = AdversaryConfig {
            attack: AdversaryKind::Pgd,
            target: AdversaryTarget::Defended,
            steps: 2,
            ..Default::default()
        };
        let (f, p) = tiny_models();
        let (f0, g0) = (snapshot(&f.vs), snapshot(p.weights()));
        // Batch-norm statistics are variables too: a training-mode pass would move them.
        assert!(f0.iter().any(|(k, _)| k.contains("running_mean")));
        let mut tuner = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
        let x = Tensor::rand([8, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
        for _ in 0..2 {
            let l = tuner.step(&x, &y, 5, (1e-2, 1e-2)).unwrap();
            assert!(l.g_ce > 0.0 && l.g_ce.is_finite(), "{l:?}");
        }
        for ((k, a), (_, b)) in f0.iter().zip(snapshot(&tuner.f.vs).iter()) {
            assert!(a.equal(b), "classifier variable {k} changed");
        }
        assert!(
            moved(&g0, tuner.p.weights()) > 0,
            "no generator weight moved: the CE gradient did not reach g"
        );
        // x' stays within the budget and the image range.
        let adv = tuner.adversarial(&x, &y).unwrap();
        let d = (&adv - &x).abs().max().double_value(&[]);
        assert!(d <= cfg.adversary.eps + 1e-6, "{d}");
        assert!(adv.min().double_value(&[]) >= 0.0 && adv.max().double_value(&[]) <= 1.0);
    }

    #[test]
    fn a_bf16_training_attack_stays_in_budget_and_follows_the_f32_one() {
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.adversary = AdversaryConfig {
            attack: AdversaryKind::Pgd,
            target: AdversaryTarget::Defended,
            steps: 1,
            ..Default::default()
        };
        let mut x_adv = |precision| {
            cfg.adversary.precision = precision;
            tch::manual_seed(12);
            let (f, p) = tiny_models();
            let tuner = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
            let (x, y) = random_batch();
            tch::manual_seed(13);
            (
                tuner.adversarial(&x, &y).unwrap(),
                x,
                cfg.adversary.describe(),
            )
        };
        let (full, x, _) = x_adv(Precision::F32);
        let (half, _, described) = x_adv(Precision::Bf16);
        assert!(described.contains("bf16"), "{described}");
        assert_eq!(half.kind(), Kind::Float);
        let d = (&half - &x).abs().max().double_value(&[]);
        assert!(d <= cfg.adversary.eps + 1e-6, "{d}");
        assert!(half.min().double_value(&[]) >= 0.0 && half.max().double_value(&[]) <= 1.0);
        // Same random start and transforms: the steps differ only where bf16 flips a
        // gradient's sign.
        let same = (&full - &x).sign().eq_tensor(&(&half - &x).sign());
        let agree = same
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(agree > 0.7 && agree < 1.0, "sign agreement {agree}");
    }

    #[test]
    fn the_kl_term_trains_g_toward_the_classifiers_clean_prediction() {
        tch::manual_seed(11);
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.l1_weight = 0.0;
        cfg.gan_weight = 0.0;
        cfg.lambda = 0.0;
        cfg.adversary = classifier_fgsm();
        let (x, y) = random_batch();
        let (f, p) = tiny_models();
        let mut off = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
        let l = off.step(&x, &y, 5, (1e-2, 1e-2)).unwrap();
        assert_eq!((l.g_kl, l.g_ce), (0.0, 0.0), "{l:?}");

        cfg.kl_weight = 1.0;
        // Before the guidance starts the term is off, as CE is.
        let late_cfg = TrainAtopConfig {
            ce_after_epochs: 1,
            ..cfg.clone()
        };
        let (f, p) = tiny_models();
        let mut late = FineTuner::new(&late_cfg, f, p, TransformConfig::default()).unwrap();
        assert_eq!(late.step(&x, &y, 0, (1e-2, 1e-2)).unwrap().g_kl, 0.0);
        let (f, p) = tiny_models();
        let g0 = snapshot(p.weights());
        let mut on = FineTuner::new(&cfg, f, p, TransformConfig::default()).unwrap();
        let l = on.step(&x, &y, 5, (1e-2, 1e-2)).unwrap();
        // A purified image is not the clean one: the divergence is positive, and only it moves g.
        assert!(l.g_kl > 0.0 && l.g_kl.is_finite(), "{l:?}");
        assert!(
            moved(&g0, on.p.weights()) > 0,
            "the KL gradient did not reach g"
        );
    }

    #[test]
    fn the_weight_average_leaves_training_alone_and_lags_the_live_weights() {
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.adversary = classifier_fgsm();
        let (x, y) = random_batch();
        // No random transform and the same initial weights in both runs: nothing here reads
        // libtorch's global generator, which tests running in parallel share.
        let transform = TransformConfig {
            kind: crate::transforms::TransformKind::None,
            ..Default::default()
        };
        let (f0, p0) = tiny_models();
        let run = |decay: f64| {
            let cfg = TrainAtopConfig {
                ema_decay: decay,
                ..cfg.clone()
            };
            let (mut f, mut p) = tiny_models();
            f.vs.copy(&f0.vs).unwrap();
            p.copy_from(&p0).unwrap();
            let mut tuner = FineTuner::new(&cfg, f, p, transform.clone()).unwrap();
            let start = snapshot(tuner.p.weights());
            for _ in 0..3 {
                tuner.step(&x, &y, 5, (1e-2, 1e-2)).unwrap();
            }
            let live = snapshot(tuner.p.weights());
            let exported = tuner.with_exported(|| snapshot(tuner.p.weights()));
            // with_exported puts the live weights back.
            assert_eq!(moved(&live, tuner.p.weights()), 0);
            (start, live, exported)
        };
        let (_, plain, plain_exported) = run(0.0);
        let (start, live, average) = run(0.9);
        // The average is a shadow: the live trajectory is the one without it.
        for ((k, a), (_, b)) in plain.iter().zip(&live) {
            assert!(a.equal(b), "{k}: the average changed training");
        }
        for ((k, a), (_, b)) in plain.iter().zip(&plain_exported) {
            assert!(
                a.equal(b),
                "{k}: without an average the live weights are exported"
            );
        }
        // After 3 warmed-up updates it lies strictly between the start and the live weights
        // on some variable.
        let between = start
            .iter()
            .zip(&live)
            .zip(&average)
            .filter(|(((_, s), (_, l)), (_, a))| {
                let d_live = (l - a).abs().max().double_value(&[]);
                let d_start = (s - a).abs().max().double_value(&[]);
                d_live > 0.0 && d_start > 0.0
            })
            .count();
        assert!(
            between > 0,
            "the average equals the start or the live weights"
        );
        let mut bad = cfg.clone();
        bad.classifier = Some("c".into());
        bad.purifier = Some("p".into());
        bad.ema_decay = 1.0;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("ema_decay = 1")
        );
    }

    #[test]
    fn bad_settings_name_the_field() {
        let mut cfg = TrainAtopConfig::preset("atop-demo").unwrap();
        cfg.classifier = Some("c".into());
        cfg.purifier = Some("p".into());
        let err = |f: &dyn Fn(&mut TrainAtopConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(&|c| c.lambda = -0.1).contains("lambda = -0.1"));
        assert!(err(&|c| c.kl_weight = f64::NAN).contains("kl_weight"));
        assert!(err(&|c| c.adversary.eot = 0).contains("adversary.eot"));
        for bad in [0.0, 1.5, f64::NAN] {
            assert!(err(&|c| c.adversary.fraction = bad).contains("adversary.fraction"));
        }
        assert!(
            err(&|c| {
                c.adversary.attack = AdversaryKind::Pgd;
                c.adversary.steps = 0
            })
            .contains("adversary.steps")
        );
        assert!(err(&|c| c.eval.subset = 0).contains("eval.subset"));
        assert!(err(&|c| c.purifier = None).contains("no purifier"));
        for bad in [0, 6, 4096] {
            assert!(err(&|c| c.widen = Some(bad)).contains("widen"));
        }
    }
}
