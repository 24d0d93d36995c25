//! `atop train classifier`: SGD with a schedule over the batch iterator, a checkpoint after every
//! epoch (model + optimizer + pointer, each written atomically), `metrics.jsonl`, a curves PNG,
//! and resumption that reaches the same weights as an uninterrupted run.
//!
//! Run folder:
//!   config.json                the effective settings
//!   checkpoints/epoch-NNNN/    model.safetensors, model.json, optimizer.safetensors
//!   last.json                  the latest complete checkpoint (written last)
//!   metrics.jsonl              one line per epoch
//!   curves.png                 loss and accuracy per epoch

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::learner::{EpochSummary, RunFolder, Step, Task};
use super::optim::{Sgd, SgdConfig};
use super::runlog;
use super::schedule::{Schedule, lr_at};
use super::setup;
use crate::data::augment::Augment;
use crate::data::loader::{EpochIter, Loader};
use crate::data::subset::seeded_subset;
use crate::data::{DataConfig, ImageSet, Split};
use crate::figures::plot;
use crate::models::accuracy::evaluate;
use crate::models::checkpoint::{self, Sidecar};
use crate::models::{Arch, Classifier, ModelSpec, dataset_normalisation};
use crate::runtime::{Precision, autocast};

pub use super::runlog::CONFIG;
pub use super::runlog::METRICS;
pub const CURVES: &str = "curves.png";
const OPTIMIZER: &str = "optimizer.safetensors";

/// Everything that defines a training run; a TOML file, a preset, or flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainClassifierConfig {
    pub data: DataConfig,
    pub arch: Arch,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    #[serde(default)]
    pub sgd: SgdConfig,
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_epochs: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    #[serde(default)]
    pub seed: u64,
    /// Training augmentation: crop+flip for 32 px data, random-resized-crop+flip otherwise.
    #[serde(default = "yes")]
    pub augment: bool,
    /// Random-translation range (pixels) of the 32 px crop+flip augmentation.
    #[serde(default = "default_crop_pad")]
    pub crop_pad: usize,
    /// Train on a seeded subset of this many images.
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Evaluate on a seeded subset of this many test images each epoch.
    #[serde(default)]
    pub test_subset: Option<usize>,
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    /// f32, or bf16 autocast for forward passes (training and the per-epoch evaluation).
    #[serde(default)]
    pub precision: Precision,
}

fn yes() -> bool {
    true
}

fn default_crop_pad() -> usize {
    4
}

fn default_eval_batch() -> usize {
    256
}

/// Named presets (TOML files in `presets/`, compiled in).
pub const PRESETS: &[(&str, &str)] = &[
    (
        "cifar10-demo",
        include_str!("../../presets/cifar10-demo.toml"),
    ),
    (
        "cifar10-small",
        include_str!("../../presets/cifar10-small.toml"),
    ),
    (
        "cifar10-cpu",
        include_str!("../../presets/cifar10-cpu.toml"),
    ),
    (
        "imagenette-cpu",
        include_str!("../../presets/imagenette-cpu.toml"),
    ),
];

impl TrainClassifierConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text)
            .with_context(|| format!("{origin}: not a valid classifier training config"))?;
        Ok(cfg)
    }

    pub fn preset(name: &str) -> Result<Self> {
        runlog::preset(PRESETS, name, "classifier")
    }

    /// Checks every number before any work starts; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: String, expected: &str| -> Result<()> {
            bail!("invalid setting {field} = {value}: expected {expected}")
        };
        super::setup::check_counts(self.epochs, self.batch_size)?;
        if self.eval_batch_size == 0 {
            bad("eval_batch_size", "0".into(), "at least 1")?;
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bad("lr", self.lr.to_string(), "a positive finite number")?;
        }
        if !(0.0..1.0).contains(&self.sgd.momentum) {
            bad(
                "sgd.momentum",
                self.sgd.momentum.to_string(),
                "a number in [0, 1)",
            )?;
        }
        if !(self.sgd.weight_decay.is_finite() && self.sgd.weight_decay >= 0.0) {
            bad(
                "sgd.weight_decay",
                self.sgd.weight_decay.to_string(),
                "a non-negative number",
            )?;
        }
        if self.sgd.nesterov && self.sgd.momentum == 0.0 {
            bad(
                "sgd.nesterov",
                "true".into(),
                "momentum > 0 (Nesterov needs momentum)",
            )?;
        }
        if !(self.sgd.bias_lr_scale.is_finite() && self.sgd.bias_lr_scale > 0.0) {
            bad(
                "sgd.bias_lr_scale",
                self.sgd.bias_lr_scale.to_string(),
                "a positive number",
            )?;
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bad(
                "label_smoothing",
                self.label_smoothing.to_string(),
                "a number in [0, 1)",
            )?;
        }
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs <= self.epochs as f64) {
            bad(
                "warmup_epochs",
                self.warmup_epochs.to_string(),
                "between 0 and epochs",
            )?;
        }
        Ok(())
    }

    fn augment_for(&self, set: &ImageSet) -> Augment {
        match (self.augment, set.height) {
            (false, _) => Augment::None,
            (true, 32) => Augment::CropFlip { pad: self.crop_pad },
            (true, side) => Augment::ResizedCropFlip {
                size: side as u32,
                scale: (0.35, 1.0),
                ratio: (3.0 / 4.0, 4.0 / 3.0),
            },
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub img_per_s: f64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct TrainSummary {
    pub run: PathBuf,
    pub epochs: usize,
    pub resumed_from_epoch: Option<usize>,
    pub test_acc: f64,
    pub seconds: f64,
    pub checkpoint: PathBuf,
}

/// Loads a run's saved settings (for `--resume`).
pub fn saved_config(run: &Path) -> Result<TrainClassifierConfig> {
    runlog::saved_config(run, "classifier")
}

/// Trains into `run`. With `resume`, continues from the run's latest checkpoint; without, the
/// folder must not already hold a run (nothing is ever overwritten).
pub fn train(
    cfg: &TrainClassifierConfig,
    run: &Path,
    device: Device,
    resume: bool,
) -> Result<TrainSummary> {
    cfg.validate()?;
    // What the run records: paths absolute.
    let owned = TrainClassifierConfig {
        data: cfg.data.absolute(),
        ..cfg.clone()
    };
    let cfg = &owned;
    let folder = RunFolder::open(run, resume)?;
    let (train_set, test_set) = load_data(cfg)?;
    let (mean, std) = dataset_normalisation(cfg.data.dataset);
    let spec = ModelSpec::new(cfg.arch, train_set.num_classes(), mean, std)?;
    tch::manual_seed(cfg.seed as i64);
    let mut model = Classifier::new(spec, device);
    // Data-dependent init (airnet's whitening) from a seeded sample of the training images;
    // a resumed run overwrites it with the checkpoint.
    if model.needs_data_init() {
        let sample = seeded_subset(train_set.len(), train_set.len().min(5000), cfg.seed)?;
        model.init_from_data(&train_set.tensors(&sample).0);
    }
    let opt = Sgd::new(&model.vs, cfg.sgd.clone());
    let loader = setup::loader(
        train_set.clone(),
        cfg.batch_size,
        cfg.augment_for(&train_set),
        cfg.seed,
    )?;
    let steps_per_epoch = loader.batches_per_epoch();
    let mut task = ClassifierTask {
        cfg,
        device,
        model,
        opt,
        loader,
        batches: None,
        train_set,
        test_set,
        warmup_steps: (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize,
        lr: 0.0,
    };
    let inputs = setup::inputs(&task.train_set, &task.test_set, &[])?;
    let fitted = folder.fit(cfg, &inputs, &mut task)?;
    Ok(TrainSummary {
        run: fitted.run,
        epochs: fitted.epochs,
        resumed_from_epoch: fitted.resumed_from_epoch,
        test_acc: fitted.last.map_or(f64::NAN, |m| m.test_acc),
        seconds: fitted.seconds,
        checkpoint: fitted.checkpoint,
    })
}

crate::losses! {
    /// A classifier step: the (label-smoothed) cross-entropy and the batch accuracy.
    pub struct ClassifierLosses { loss, accuracy }
}

/// SGD on a classifier, evaluated on the test split after every epoch.
struct ClassifierTask<'a> {
    cfg: &'a TrainClassifierConfig,
    device: Device,
    model: Classifier,
    opt: Sgd,
    loader: Loader,
    batches: Option<EpochIter>,
    train_set: Arc<ImageSet>,
    test_set: Arc<ImageSet>,
    warmup_steps: usize,
    /// The learning rate of the latest step.
    lr: f64,
}

impl Task for ClassifierTask<'_> {
    type Losses = ClassifierLosses;
    type Record = EpochMetrics;

    fn epochs(&self) -> usize {
        self.cfg.epochs
    }

    fn steps_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch()
    }

    fn begin_epoch(&mut self, epoch: usize) {
        self.batches = Some(self.loader.epoch(epoch as u64));
    }

    fn step(&mut self, step: Step) -> Result<(ClassifierLosses, usize)> {
        let cfg = self.cfg;
        let batch = self
            .batches
            .as_mut()
            .and_then(|b| b.next())
            .context("the batch iterator ended early")?;
        self.lr = lr_at(
            cfg.schedule,
            cfg.lr,
            step.global,
            step.total,
            self.warmup_steps,
        );
        let (x, y) = (
            batch.images.to_device(self.device),
            batch.labels.to_device(self.device),
        );
        let model = &self.model;
        let (logits, loss) = autocast(self.device, cfg.precision, || {
            let logits = model.forward_t(&x, true);
            let loss = logits.cross_entropy_loss::<Tensor>(
                &y,
                None,
                tch::Reduction::Mean,
                -100,
                cfg.label_smoothing,
            );
            (logits, loss)
        });
        let value = loss.double_value(&[]);
        if value.is_finite() {
            self.opt.zero_grad();
            loss.backward();
            self.opt.step(self.lr);
        }
        let n = batch.indices.len();
        let correct = logits
            .argmax(-1, false)
            .eq_tensor(&y)
            .sum(Kind::Int64)
            .int64_value(&[]);
        Ok((
            ClassifierLosses {
                loss: value,
                accuracy: correct as f64 / n.max(1) as f64,
            },
            n,
        ))
    }

    fn progress(&self, m: &ClassifierLosses) -> String {
        format!("loss {:.3} acc {:.1}%", m.loss, 100.0 * m.accuracy)
    }

    fn end_epoch(
        &mut self,
        _run: &Path,
        e: EpochSummary<ClassifierLosses>,
    ) -> Result<EpochMetrics> {
        let eval = evaluate(
            &self.model,
            self.test_set.clone(),
            self.cfg.eval_batch_size,
            self.device,
            self.cfg.precision,
        )?;
        Ok(EpochMetrics {
            epoch: e.epoch,
            lr: self.lr,
            train_loss: e.losses.loss,
            train_acc: e.losses.accuracy,
            test_loss: eval.loss,
            test_acc: eval.accuracy,
            img_per_s: e.img_per_s,
            seconds: e.started.elapsed().as_secs_f64(),
        })
    }

    fn describe(&self, m: &EpochMetrics) -> String {
        format!(
            "lr {:.4} train loss {:.3} acc {:.2}% | test loss {:.3} acc {:.2}% | {:.0} img/s, {:.1} s",
            m.lr,
            m.train_loss,
            100.0 * m.train_acc,
            m.test_loss,
            100.0 * m.test_acc,
            m.img_per_s,
            m.seconds
        )
    }

    fn save(&self, dir: &Path, epoch: usize, _step: usize) -> Result<()> {
        let sidecar = Sidecar::new(
            self.model.spec.clone(),
            Some(self.cfg.data.dataset.as_str().to_string()),
            self.train_set.classes.clone(),
            Some(epoch),
            serde_json::to_value(self.cfg)?,
        );
        checkpoint::save(&self.model, &sidecar, dir)?;
        crate::io::write_safetensors(&dir.join(OPTIMIZER), &self.opt.state())
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        checkpoint::load_weights(&mut self.model, &dir.join(checkpoint::WEIGHTS))?;
        self.opt
            .load_state(checkpoint::read_tensors(&dir.join(OPTIMIZER))?)
            .with_context(|| format!("{}", dir.join(OPTIMIZER).display()))
    }

    fn finish(&mut self, run: &Path) -> Result<()> {
        write_curves(run)
    }

    fn divergence_hint(&self) -> &'static str {
        "Lower lr or add warm-up."
    }
}

fn load_data(cfg: &TrainClassifierConfig) -> Result<(Arc<ImageSet>, Arc<ImageSet>)> {
    let train = setup::subset(cfg.data.load(Split::Train)?, cfg.train_subset, cfg.seed)?;
    let test = setup::subset(cfg.data.load(Split::Test)?, cfg.test_subset, cfg.seed)?;
    if train.classes != test.classes {
        bail!(
            "train and test splits of {} have different classes",
            train.source.display()
        );
    }
    Ok((Arc::new(train), Arc::new(test)))
}

pub fn read_metrics(run: &Path) -> Result<Vec<EpochMetrics>> {
    runlog::read(run)
}

impl runlog::EpochRecord for EpochMetrics {
    fn epoch(&self) -> usize {
        self.epoch
    }
}

fn write_curves(run: &Path) -> Result<()> {
    let m = read_metrics(run)?;
    let series = |name: &str, f: &dyn Fn(&EpochMetrics) -> f64| plot::Series {
        name: name.into(),
        points: m.iter().map(|e| (e.epoch as f64, f(e))).collect(),
    };
    let loss = plot::line_chart(
        "loss",
        "epoch",
        &[
            series("train", &|e| e.train_loss),
            series("test", &|e| e.test_loss),
        ],
    );
    let acc = plot::line_chart(
        "accuracy (%)",
        "epoch",
        &[
            series("train", &|e| 100.0 * e.train_acc),
            series("test", &|e| 100.0 * e.test_acc),
        ],
    );
    crate::figures::grid::save_png(&plot::hconcat(&[loss, acc]), &run.join(CURVES))
}

/// `runs/classifier-<dataset>-<arch>`, the run folder when no `--out` is given.
pub fn default_out(cfg: &TrainClassifierConfig) -> PathBuf {
    PathBuf::from("runs").join(format!(
        "classifier-{}-{}",
        cfg.data.dataset.as_str(),
        cfg.arch
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_validates() {
        for (name, _) in PRESETS {
            let cfg = TrainClassifierConfig::preset(name).unwrap();
            cfg.validate()
                .unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
        assert!(
            TrainClassifierConfig::preset("cifar10-cpu")
                .unwrap()
                .precision
                == Precision::Auto
        );
    }
}
