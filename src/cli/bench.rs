//! `atop bench ...`: timings measured on this machine, printed as a table (or JSON).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use atop::data::augment::Augment;
use atop::data::loader::{Loader, LoaderConfig};
use atop::data::{DataConfig, DatasetKind, Split};
use atop::runtime::synchronize;
use clap::{Args as ClapArgs, Subcommand};
use serde::Serialize;

use super::Global;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Decoding all of CIFAR-10 into memory, and the training iterator's batches/s.
    Data(DataBenchArgs),
    /// Classifier inference and training img/s, side by side with PyTorch in the same venv.
    Models(ModelBenchArgs),
    /// PGD-20 and APGD-CE-100 img/s, side by side with torchattacks on the same weights.
    Attacks(AttackBenchArgs),
    /// Purifier training steps on the resolution pipeline (img/s, side by side with its PyTorch
    /// twin) and the cost of one whole-model attack step through it.
    Purifier(Box<PurifierBenchArgs>),
    /// AToP fine-tuning steps (the attack that makes x', the purifier's pass, the frozen
    /// classifier's CE, the optimizer steps), side by side with a PyTorch reference of the step.
    Atop(Box<AtopBenchArgs>),
    /// An accelerator against the CPU: the classifier's forward and training step, PGD, the
    /// purifier's pass and training step at its working size and the whole model's input
    /// gradient, from the same weights and inputs on both (f32), compared, with each step's
    /// cost per image on each. Run it with `--device cuda`.
    Device(Box<DeviceBenchArgs>),
}

#[derive(Debug, ClapArgs)]
pub struct DeviceBenchArgs {
    /// The trained classifier (checkpoint folder or training run) both devices load.
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[command(flatten)]
    pub data: super::data::ModelDataArgs,
    /// A seeded subset of this many images for the classifier's steps.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 256)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The purifier preset whose generator (freshly initialised, the same weights on both
    /// devices), working size and transform the purifier's steps use.
    #[arg(long, default_value = "purifier-cifar10-paper")]
    pub purifier_preset: String,
    /// Images (the subset's first) for the purifier's steps.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 8)]
    pub purifier_images: usize,
    /// PGD iterations on the classifier (Linf, no random start, step eps / 4).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 10)]
    pub pgd_steps: usize,
    #[arg(long, default_value = atop::attacks::defaults::EPS_TEXT, value_parser = atop::attacks::parse_eps)]
    pub eps: f64,
}

#[derive(Debug, ClapArgs)]
pub struct AtopBenchArgs {
    /// AToP presets to time (their loss weights, attack, optimizer and precision).
    #[arg(long, num_args = 1.., default_values = ["atop-cifar10-cpu"])]
    pub preset: Vec<String>,
    /// The purifier preset whose generator, working size and transform are fine-tuned.
    #[arg(long, default_value = "purifier-cifar10-cpu")]
    pub purifier_preset: String,
    /// Overrides of the presets' attack (e.g. `--adversary fgsm --adversary-target classifier`).
    #[command(flatten)]
    pub adversary: super::train::AdversaryArgs,
    /// Images per step (default: the preset's batch size).
    #[arg(value_parser = crate::cli::batch, long)]
    pub batch: Option<usize>,
    /// Timed steps per round (after `--warmup` untimed ones).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Alternating rounds of atop and PyTorch timings; the medians are reported.
    #[arg(value_parser = crate::cli::rounds, long, default_value_t = 3)]
    pub rounds: usize,
    /// The frozen classifier (randomly initialised; the CPU presets' classifier by default).
    #[arg(long, default_value = "airnet-32-64-128")]
    pub classifier_arch: atop::models::Arch,
    /// Skip the PyTorch side.
    #[arg(long)]
    pub no_reference: bool,
}

#[derive(Debug, ClapArgs)]
pub struct PurifierBenchArgs {
    /// Purifier training presets to time (their architecture, working size and RT2 settings);
    /// without presets, the widths below.
    #[arg(long, num_args = 1..)]
    pub preset: Vec<String>,
    /// Generator widths c (48 is the paper's), each with the architecture flags below.
    #[arg(long, num_args = 1.., default_values = ["48", "16"], conflicts_with = "preset")]
    pub width: Vec<usize>,
    #[command(flatten)]
    pub arch: super::purifier::PurifierArchArgs,
    #[command(flatten)]
    pub transform: super::purifier::TransformArgs,
    /// Images per training step.
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 32)]
    pub batch: usize,
    /// Image side (the classifier's input).
    #[arg(long, default_value_t = 32, value_parser = crate::cli::image_side)]
    pub size: i64,
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Alternating rounds of atop and PyTorch timings; the medians are reported (the machine's
    /// speed drifts, so one measurement of each side is not a comparison).
    #[arg(value_parser = crate::cli::rounds, long, default_value_t = 3)]
    pub rounds: usize,
    /// Images per whole-model attack step (0: skip the attack-step timing).
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 4)]
    pub attack_batch: usize,
    /// Timed whole-model attack steps (after one untimed).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 3)]
    pub attack_steps: usize,
    /// The classifier behind the purifier in the attack step (randomly initialised; the CPU
    /// presets' classifier by default).
    #[arg(long, default_value = "airnet-32-64-128")]
    pub classifier_arch: atop::models::Arch,
    /// Skip the PyTorch side.
    #[arg(long)]
    pub no_reference: bool,
}

#[derive(Debug, ClapArgs)]
pub struct AttackBenchArgs {
    /// Architectures (randomly initialised; both sides load the same weights).
    #[arg(long, num_args = 1.., default_values = ["airnet-64-256-256"])]
    pub arch: Vec<String>,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 128)]
    pub batch: usize,
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 1)]
    pub batches: usize,
    /// PGD iterations.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 20)]
    pub pgd_steps: usize,
    /// APGD-CE iterations.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 100)]
    pub apgd_steps: usize,
    /// Put Gaussian noise of this sigma in front of the classifier (a randomized defence,
    /// drawn per image and pixel, on both sides).
    #[arg(long)]
    pub noise: Option<f64>,
    /// EOT draws per attack step (torchattacks' `eot_iter`); above 1 only APGD-CE is timed
    /// (torchattacks' PGD has no EOT).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 1)]
    pub eot: usize,
    /// Alternating rounds of atop and torchattacks timings; the medians are reported (the
    /// machine's speed drifts, so one measurement of each side is not a comparison).
    #[arg(value_parser = crate::cli::rounds, long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip the torchattacks side.
    #[arg(long)]
    pub no_reference: bool,
}

#[derive(Debug, ClapArgs)]
pub struct ModelBenchArgs {
    /// Architectures to time (each with --batch images of its native size: 32 px, or 64 px for -imagenet).
    #[arg(long, num_args = 1.., default_values = ["wrn-16-4"])]
    pub arch: Vec<String>,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 128)]
    pub batch: usize,
    /// Timed steps per measurement (after --warmup untimed ones).
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Skip the PyTorch side (atop numbers only).
    #[arg(long)]
    pub no_reference: bool,
    /// Input side (default: 32, or 64 for -imagenet architectures).
    #[arg(long, value_parser = crate::cli::image_side)]
    pub image_size: Option<i64>,
    /// f32, or bf16 autocast (both sides).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: atop::runtime::Precision,
}

#[derive(Debug, ClapArgs)]
pub struct DataBenchArgs {
    /// CIFAR-10 folder or archive (default: found in $ATOP_DATA_DIR).
    #[arg(long)]
    pub cifar10: Option<std::path::PathBuf>,
    /// ImageNette folder or archive (default: found in $ATOP_DATA_DIR); skipped if absent.
    #[arg(long)]
    pub imagenette: Option<std::path::PathBuf>,
    /// ImageNette training resolution for the iterator benchmark.
    #[arg(long, default_value_t = 128)]
    pub imagenette_size: u32,
    #[arg(value_parser = crate::cli::batch, long, default_value_t = 128)]
    pub batch_size: usize,
    /// Batches timed per iterator benchmark.
    #[arg(value_parser = crate::cli::positive, long, default_value_t = 200)]
    pub batches: usize,
}

#[derive(Serialize)]
struct Row {
    what: String,
    value: f64,
    unit: &'static str,
}

pub fn run(cmd: BenchCommand, global: &Global) -> Result<()> {
    match cmd {
        BenchCommand::Data(args) => data(args, global),
        BenchCommand::Models(args) => models(args, global),
        BenchCommand::Attacks(args) => attacks(args, global),
        BenchCommand::Purifier(args) => purifier(*args, global),
        BenchCommand::Atop(args) => atop_step(*args, global),
        BenchCommand::Device(args) => device(*args, global),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Medians of side-by-side timings (rates: higher is faster).
struct Alternated {
    ours: f64,
    theirs: Option<f64>,
    /// The median of each round's ours / theirs.
    ratio: Option<f64>,
}

/// Times atop, then (with `reference`) the reference, back to back in each of `rounds`
/// rounds: the machine's speed drifts over minutes, so only pairs measured together compare.
fn alternate(
    rounds: usize,
    reference: bool,
    ours: &mut dyn FnMut() -> Result<f64>,
    theirs: &mut dyn FnMut() -> Result<f64>,
) -> Result<Alternated> {
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let o = ours()?;
        a.push(o);
        if reference {
            let t = theirs()?;
            b.push(t);
            ratios.push(o / t);
        }
    }
    Ok(Alternated {
        ours: median(&a),
        theirs: reference.then(|| median(&b)),
        ratio: reference.then(|| median(&ratios)),
    })
}

/// Seconds for `steps` calls of `f` after `warmup` untimed ones (CUDA synchronised).
fn timed(device: tch::Device, warmup: usize, steps: usize, f: &mut dyn FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    synchronize(device);
    let t = Instant::now();
    for _ in 0..steps {
        f();
    }
    synchronize(device);
    t.elapsed().as_secs_f64()
}

#[derive(Serialize)]
struct PurifierRow {
    name: String,
    purifier: String,
    transform: String,
    batch: usize,
    size: i64,
    work_size: i64,
    parameters: i64,
    atop_img_s: f64,
    pytorch_img_s: Option<f64>,
    /// The median over rounds of atop / PyTorch, each round timing both sides back to back.
    ratio: Option<f64>,
    rounds: usize,
    /// Seconds per image of one whole-model attack step (forward and input gradient through
    /// resize, transform, generator, resize and classifier), at `attack_batch`.
    attack_s_per_img: Option<f64>,
    attack_batch: usize,
}

fn purifier(args: PurifierBenchArgs, global: &Global) -> Result<()> {
    use anyhow::{Context, bail};
    use atop::models::Model;
    use atop::models::pipeline::Pipeline;
    use atop::purifier::defended::Purify;
    use atop::purifier::{GanPurifier, PurifierConfig};
    use atop::train::purifier::TrainPurifierConfig;
    use atop::transforms::{TransformConfig, TransformKind};
    use tch::{Kind, Tensor};

    if args.batch == 0 || args.steps == 0 || args.size <= 0 {
        bail!("--batch, --steps and --size must be positive");
    }
    // (row name, purifier, transform): the presets', or one per width.
    let mut setups = Vec::new();
    for name in &args.preset {
        let cfg = TrainPurifierConfig::preset(name)?;
        setups.push((name.clone(), cfg.purifier, cfg.transform));
    }
    if args.preset.is_empty() {
        for &width in &args.width {
            let mut p = PurifierConfig {
                width,
                ..Default::default()
            };
            args.arch.apply(&mut p);
            let mut t = TransformConfig::default();
            args.transform.apply(&mut t);
            setups.push((format!("width {width}"), p, t));
        }
    }
    let threads = atop::runtime::threads();
    let device = global.device;
    let mut rows = Vec::new();
    for (name, cfg, mut transform) in setups {
        // Timed under RT2 (the paper's main setting), with the row's noise and mask settings.
        transform.kind = TransformKind::Rt2;
        cfg.validate()?;
        cfg.check_images(args.size, args.size, &transform)?;
        tch::manual_seed(0);
        let p = GanPurifier::new(cfg.clone(), device)?;
        let (n, s) = (args.batch as i64, args.size);
        let x = Tensor::rand([n, 3, s, s], (Kind::Float, device));
        // One generator training step as the trainer takes it (without the optimizer).
        let atop_side = || {
            let secs = timed(device, args.warmup, args.steps, &mut || {
                let pass = p.pass(&x, &transform);
                let target = &pass.clean * 2.0 - 1.0;
                ((&pass.x1 - &target).abs().mean(Kind::Float)
                    + (&pass.x2 - &target).abs().mean(Kind::Float)
                    + (&pass.purified - &x).abs().mean(Kind::Float))
                .backward();
            });
            (args.batch * args.steps) as f64 / secs
        };
        let work = cfg.work_size.map_or(s, |w| w as i64);
        let reference = !args.no_reference && device == tch::Device::Cpu;
        let mut pytorch_side = || -> Result<f64> {
            let (script, mut cmd) = reference_script("purifier.py");
            cmd.arg("bench")
                .args(["--width", &cfg.width.to_string()])
                .args(["--stages", &cfg.stages.to_string()])
                .args(["--skips", &u8::from(cfg.skips).to_string()])
                .args(["--group-norm", &u8::from(cfg.group_norm).to_string()])
                .args(["--residual", &u8::from(cfg.residual).to_string()])
                .args(["--work-size", &work.to_string()])
                .args(["--sigma", &transform.sigma.to_string()])
                .args(["--grid", &transform.grid.to_string()])
                .args(["--holes", &transform.holes().to_string()])
                .args(["--batch", &args.batch.to_string()])
                .args(["--size", &s.to_string()])
                .args(["--steps", &args.steps.to_string()])
                .args(["--warmup", &args.warmup.to_string()])
                .args(["--threads", &threads.to_string()]);
            if !cfg.attention {
                cmd.arg("--no-attention");
            }
            let out = run_reference(&script, &mut cmd)?;
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .with_context(|| format!("unexpected output from {}: {line}", script.display()))?;
            v["train_img_s"]
                .as_f64()
                .with_context(|| format!("no train_img_s from {}", script.display()))
        };
        let timing = alternate(
            args.rounds,
            reference,
            &mut || Ok(atop_side()),
            &mut pytorch_side,
        )?;
        // One whole-model attack step: the input gradient of the classifier's loss through
        // the defended model, at a small batch.
        let attack_s_per_img = if args.attack_batch > 0 && args.attack_steps > 0 {
            let (mean, std) = atop::models::dataset_normalisation(DatasetKind::Cifar10);
            let spec = atop::models::ModelSpec::new(args.classifier_arch, 10, mean, std)?;
            let classifier = atop::models::Classifier::new(spec, device);
            let pipeline = Pipeline {
                stages: vec![Box::new(Purify {
                    purifier: &p,
                    transform: transform.clone(),
                })],
                model: &classifier,
            };
            let xa = Tensor::rand([args.attack_batch as i64, 3, s, s], (Kind::Float, device));
            let ya = Tensor::zeros([args.attack_batch as i64], (Kind::Int64, device));
            let secs = timed(device, 1, args.attack_steps, &mut || {
                let xa = xa.detach().set_requires_grad(true);
                let loss = pipeline.logits(&xa).cross_entropy_for_logits(&ya);
                let _ = Tensor::run_backward(&[loss], &[&xa], false, false);
            });
            Some(secs / (args.attack_batch * args.attack_steps) as f64)
        } else {
            None
        };
        rows.push(PurifierRow {
            name,
            purifier: cfg.describe(),
            transform: transform.describe(),
            batch: args.batch,
            size: s,
            work_size: work,
            parameters: p.generator_parameters(),
            atop_img_s: timing.ours,
            pytorch_img_s: timing.theirs,
            ratio: timing.ratio,
            rounds: args.rounds.max(1),
            attack_s_per_img,
            attack_batch: args.attack_batch,
        });
    }
    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "purifier training step on the resolution pipeline (resize, RT2, generator forward+backward, resize), device {device:?}, threads {threads}, batch {}, {} px images, {} timed steps, medians of {} alternating rounds",
        args.batch,
        args.size,
        args.steps,
        args.rounds.max(1)
    );
    println!(
        "{:<24} {:>5} {:>9} {:>11} {:>12} {:>7} {:>16}",
        "setting", "work", "params", "atop img/s", "torch img/s", "ratio", "attack s/img"
    );
    for r in &rows {
        println!(
            "{:<24} {:>5} {:>9} {:>11.2} {:>12} {:>7} {:>16}",
            r.name,
            r.work_size,
            r.parameters,
            r.atop_img_s,
            r.pytorch_img_s.map_or("-".into(), |v| format!("{v:.2}")),
            r.ratio.map_or("-".into(), |v| format!("{v:.2}")),
            r.attack_s_per_img
                .map_or("-".into(), |v| format!("{v:.4} (b={})", r.attack_batch)),
        );
        println!("  {} under {}", r.purifier, r.transform);
    }
    Ok(())
}

#[derive(Serialize)]
struct AtopRow {
    preset: String,
    purifier: String,
    transform: String,
    adversary: String,
    precision: String,
    batch: usize,
    atop_steps_s: f64,
    pytorch_steps_s: Option<f64>,
    /// The median over rounds of atop / PyTorch, each round timing both sides back to back.
    ratio: Option<f64>,
    rounds: usize,
}

/// Times `FineTuner::step` (the trainer's own step) on random weights and images, and the
/// PyTorch reference of the same step (`bench/reference/atop_step.py`) with the same settings.
fn atop_step(args: AtopBenchArgs, global: &Global) -> Result<()> {
    use anyhow::{Context, bail};
    use atop::purifier::GanPurifier;
    use atop::runtime::Precision;
    use atop::train::atop::{
        AdversaryKind, AdversaryTarget, FineTuner, Reconstruction, TrainAtopConfig,
    };
    use atop::train::purifier::TrainPurifierConfig;
    use tch::{Kind, Tensor};

    if args.steps == 0 || args.batch == Some(0) {
        bail!("--steps and --batch must be positive");
    }
    let device = global.device;
    let threads = atop::runtime::threads();
    let pre = TrainPurifierConfig::preset(&args.purifier_preset)?;
    let pcfg = pre.purifier.clone();
    pcfg.validate()?;
    let side = 32;
    let mut rows = Vec::new();
    for name in &args.preset {
        let mut cfg = TrainAtopConfig::preset(name)?;
        args.adversary.apply(&mut cfg.adversary);
        cfg.adversary.validate()?;
        if let Some(b) = args.batch {
            cfg.batch_size = b;
        }
        let transform = cfg
            .transform
            .clone()
            .unwrap_or_else(|| pre.transform.clone());
        pcfg.check_images(side, side, &transform)?;
        let precision = cfg.precision.resolve(device);
        cfg.precision = precision;
        let n = cfg.batch_size as i64;
        tch::manual_seed(0);
        let (mean, std) = atop::models::dataset_normalisation(DatasetKind::Cifar10);
        let spec = atop::models::ModelSpec::new(args.classifier_arch, 10, mean, std)?;
        let f = atop::models::Classifier::new(spec, device);
        let p = GanPurifier::new(pcfg.clone(), device)?;
        let mut tuner = FineTuner::new(&cfg, f, p, transform.clone())?;
        let x = Tensor::rand([n, 3, side, side], (Kind::Float, device));
        let y = Tensor::randint(10, [n], (Kind::Int64, device));
        let lr = cfg.generator_optimizer.lr;
        // The CE term on (epoch past the warm-up), as in the trainer's later epochs.
        let epoch = cfg.ce_after_epochs;
        tuner.step(&x, &y, epoch, (lr, lr))?;
        let (steps, step_size, _) = cfg.adversary.schedule();
        let reference = !args.no_reference && device == tch::Device::Cpu;
        let mut pytorch_side = || -> Result<f64> {
            let (script, mut cmd) = reference_script("atop_step.py");
            let work = pcfg.work_size.map_or(side, |w| w as i64);
            cmd.args(["--width", &pcfg.width.to_string()])
                .args(["--stages", &pcfg.stages.to_string()])
                .args(["--skips", &u8::from(pcfg.skips).to_string()])
                .args(["--group-norm", &u8::from(pcfg.group_norm).to_string()])
                .args(["--residual", &u8::from(pcfg.residual).to_string()])
                .args(["--disc-width", &pcfg.disc_width.to_string()])
                .args(["--classifier", &args.classifier_arch.to_string()])
                .args(["--batch", &n.to_string()])
                .args(["--size", &side.to_string()])
                .args(["--work-size", &work.to_string()])
                .args(["--sigma", &transform.sigma.to_string()])
                .args(["--grid", &transform.grid.to_string()])
                .args(["--holes", &transform.holes().to_string()])
                .args([
                    "--attack",
                    match cfg.adversary.attack {
                        AdversaryKind::Fgsm => "fgsm",
                        AdversaryKind::Pgd => "pgd",
                    },
                ])
                .args([
                    "--target",
                    match cfg.adversary.target {
                        AdversaryTarget::Classifier => "classifier",
                        AdversaryTarget::Defended => "defended",
                    },
                ])
                .args(["--eps", &cfg.adversary.eps.to_string()])
                .args(["--steps", &steps.to_string()])
                .args(["--step-size", &step_size.to_string()])
                .args(["--eot", &cfg.adversary.eot.to_string()])
                .args(["--fraction", &cfg.adversary.fraction.to_string()])
                .args(["--lam", &cfg.lambda.to_string()])
                .args([
                    "--reconstruction",
                    match cfg.reconstruction {
                        Reconstruction::Clean => "clean",
                        Reconstruction::Adversarial => "adversarial",
                    },
                ])
                .args(["--gan-weight", &cfg.gan_weight.to_string()])
                .args(["--l1-weight", &cfg.l1_weight.to_string()])
                .args(["--lr", &lr.to_string()])
                .args([
                    "--bf16",
                    if precision == Precision::Bf16 {
                        "1"
                    } else {
                        "0"
                    },
                ])
                .args([
                    "--attack-bf16",
                    if cfg.adversary.precision.resolve(device) == Precision::Bf16 {
                        "1"
                    } else {
                        "0"
                    },
                ])
                .args(["--timed", &args.steps.to_string()])
                .args(["--warmup", &args.warmup.to_string()])
                .args(["--threads", &threads.to_string()]);
            if !pcfg.attention {
                cmd.arg("--no-attention");
            }
            let out = run_reference(&script, &mut cmd)?;
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .with_context(|| format!("unexpected output from {}: {line}", script.display()))?;
            v["steps_s"]
                .as_f64()
                .with_context(|| format!("no steps_s from {}", script.display()))
        };
        let timing = alternate(
            args.rounds,
            reference,
            &mut || {
                let mut failed = None;
                let secs = timed(device, args.warmup, args.steps, &mut || {
                    if let Err(e) = tuner.step(&x, &y, epoch, (lr, lr)) {
                        failed.get_or_insert(e);
                    }
                });
                match failed {
                    Some(e) => Err(e),
                    None => Ok(args.steps as f64 / secs),
                }
            },
            &mut pytorch_side,
        )?;
        rows.push(AtopRow {
            preset: name.clone(),
            purifier: pcfg.describe(),
            transform: transform.describe(),
            adversary: cfg.adversary.describe(),
            precision: format!("{precision:?}").to_lowercase(),
            batch: cfg.batch_size,
            atop_steps_s: timing.ours,
            pytorch_steps_s: timing.theirs,
            ratio: timing.ratio,
            rounds: args.rounds.max(1),
        });
    }
    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "AToP fine-tuning step (x' attack, purifier pass, frozen-classifier CE, optimizer steps), device {device:?}, threads {threads}, {} timed steps, medians of {} alternating rounds",
        args.steps,
        args.rounds.max(1)
    );
    println!(
        "{:<22} {:>5} {:>6} {:>12} {:>13} {:>7}",
        "preset", "batch", "prec", "atop step/s", "torch step/s", "ratio"
    );
    for r in &rows {
        println!(
            "{:<22} {:>5} {:>6} {:>12.3} {:>13} {:>7}",
            r.preset,
            r.batch,
            r.precision,
            r.atop_steps_s,
            r.pytorch_steps_s.map_or("-".into(), |v| format!("{v:.3}")),
            r.ratio.map_or("-".into(), |v| format!("{v:.2}")),
        );
        println!(
            "  x' by {}; {} under {}",
            r.adversary, r.purifier, r.transform
        );
    }
    Ok(())
}

fn data(args: DataBenchArgs, global: &Global) -> Result<()> {
    let mut rows = Vec::new();
    let cifar = DataConfig {
        root: args.cifar10.clone(),
        ..DataConfig::new(DatasetKind::Cifar10)
    };
    let t = Instant::now();
    let train = cifar.load(Split::Train)?;
    let test = cifar.load(Split::Test)?;
    let secs = t.elapsed().as_secs_f64();
    let n = train.len() + test.len();
    rows.push(Row {
        what: format!(
            "CIFAR-10 decode all {n} images ({})",
            train.source.display()
        ),
        value: secs,
        unit: "s",
    });
    rows.push(Row {
        what: "CIFAR-10 decode rate".into(),
        value: n as f64 / secs,
        unit: "img/s",
    });
    let train = Arc::new(train);
    rows.push(iterate(
        "CIFAR-10 train iterator, crop+flip",
        Loader::new(
            train,
            LoaderConfig::train(args.batch_size, Augment::cifar(), 0),
        ),
        args.batches,
    ));

    let nette = DataConfig {
        root: args.imagenette.clone(),
        ..DataConfig::new(DatasetKind::Imagenette)
    };
    if nette.resolve_root().is_ok() {
        let t = Instant::now();
        let set = nette.load(Split::Train)?;
        let secs = t.elapsed().as_secs_f64();
        rows.push(Row {
            what: format!(
                "ImageNette decode {} train images at {}px",
                set.len(),
                set.height
            ),
            value: secs,
            unit: "s",
        });
        let size = args.imagenette_size;
        rows.push(iterate(
            &format!("ImageNette train iterator, random-resized-crop {size}px + flip"),
            Loader::new(
                Arc::new(set),
                LoaderConfig::train(args.batch_size, Augment::resized_crop(size), 0),
            ),
            args.batches,
        ));
    }

    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("threads: {}", atop::runtime::threads());
        for r in &rows {
            println!("{:<70} {:>10.2} {}", r.what, r.value, r.unit);
        }
    }
    Ok(())
}

fn iterate(what: &str, loader: Loader, batches: usize) -> Row {
    let batches = batches.min(loader.batches_per_epoch());
    let t = Instant::now();
    let mut seen = 0;
    for batch in loader.epoch(0).take(batches) {
        seen += batch.indices.len();
    }
    let secs = t.elapsed().as_secs_f64();
    Row {
        what: format!("{what}: {batches} batches ({seen} images)"),
        value: batches as f64 / secs,
        unit: "batches/s",
    }
}

#[derive(Serialize, serde::Deserialize)]
struct ModelTiming {
    arch: String,
    #[serde(default)]
    precision: String,
    batch: usize,
    threads: usize,
    infer_img_s: f64,
    train_img_s: f64,
}

#[derive(Serialize)]
struct ModelRow {
    atop: ModelTiming,
    pytorch: Option<ModelTiming>,
    infer_ratio: Option<f64>,
    train_ratio: Option<f64>,
}

fn models(args: ModelBenchArgs, global: &Global) -> Result<()> {
    use atop::models::{Arch, Classifier, ModelSpec, dataset_normalisation};
    use tch::{Kind, Tensor, nn::OptimizerConfig};

    let threads = atop::runtime::threads();
    let mut rows = Vec::new();
    for name in &args.arch {
        let arch: Arch = name.parse().map_err(anyhow::Error::msg)?;
        let side = args.image_size.unwrap_or(match arch {
            Arch::ResNet {
                stem: atop::models::Stem::Imagenet,
                ..
            } => 64,
            _ => 32,
        });
        let (mean, std) = dataset_normalisation(DatasetKind::Cifar10);
        tch::manual_seed(0);
        let model = Classifier::new(ModelSpec::new(arch, 10, mean, std)?, global.device);
        let x = Tensor::rand(
            [args.batch as i64, 3, side, side],
            (Kind::Float, global.device),
        );
        let y = Tensor::randint(10, [args.batch as i64], (Kind::Int64, global.device));
        let mut opt = tch::nn::Sgd {
            momentum: 0.9,
            dampening: 0.0,
            wd: 5e-4,
            nesterov: false,
        }
        .build(&model.vs, 0.01)?;
        let p = args.precision.resolve(global.device);
        let t_inf = timed(global.device, args.warmup, args.steps, &mut || {
            let _ = tch::no_grad(|| {
                atop::runtime::autocast(global.device, p, || model.forward_t(&x, false))
            });
        });
        let t_train = timed(global.device, args.warmup, args.steps, &mut || {
            let loss = atop::runtime::autocast(global.device, p, || {
                model.forward_t(&x, true).cross_entropy_for_logits(&y)
            });
            opt.backward_step(&loss);
        });
        let n = (args.batch * args.steps) as f64;
        let ours = ModelTiming {
            arch: name.clone(),
            precision: format!("{p:?}").to_lowercase(),
            batch: args.batch,
            threads,
            infer_img_s: n / t_inf,
            train_img_s: n / t_train,
        };
        let reference = if args.no_reference || global.device != tch::Device::Cpu {
            None
        } else {
            Some(pytorch_timing(name, &args, threads)?)
        };
        rows.push(ModelRow {
            infer_ratio: reference.as_ref().map(|r| ours.infer_img_s / r.infer_img_s),
            train_ratio: reference.as_ref().map(|r| ours.train_img_s / r.train_img_s),
            atop: ours,
            pytorch: reference,
        });
    }
    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "device {:?}, threads {threads}, batch {}, {} timed steps",
        global.device, args.batch, args.steps
    );
    println!(
        "{:<20} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
        "arch", "atop inf/s", "torch inf/s", "ratio", "atop train/s", "torch trn/s", "ratio"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let ratio = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in &rows {
        println!(
            "{:<20} {:>12.1} {:>12} {:>7} {:>12.1} {:>12} {:>7}",
            r.atop.arch,
            r.atop.infer_img_s,
            opt(r.pytorch.as_ref().map(|p| p.infer_img_s)),
            ratio(r.infer_ratio),
            r.atop.train_img_s,
            opt(r.pytorch.as_ref().map(|p| p.train_img_s)),
            ratio(r.train_ratio),
        );
    }
    Ok(())
}

/// Runs bench/reference/bench_models.py with the venv's PyTorch on the same settings.
fn pytorch_timing(arch: &str, args: &ModelBenchArgs, threads: usize) -> Result<ModelTiming> {
    use anyhow::Context;
    let (script, mut cmd) = reference_script("bench_models.py");
    cmd.args(["--arch", arch])
        .args(["--batch", &args.batch.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(args.image_size.map(|s| format!("--image-size={s}")))
        .args([
            "--precision",
            if args.precision.resolve(tch::Device::Cpu) == atop::runtime::Precision::Bf16 {
                "bf16"
            } else {
                "f32"
            },
        ]);
    let out = run_reference(&script, &mut cmd)?;
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim())
        .with_context(|| format!("unexpected output from {}: {line}", script.display()))
}

#[derive(Serialize)]
struct AttackRow {
    arch: String,
    attack: String,
    images: usize,
    threads: usize,
    atop_img_s: f64,
    torchattacks_img_s: Option<f64>,
    /// The median over rounds of atop / torchattacks, each round timing both back to back.
    ratio: Option<f64>,
    rounds: usize,
    /// Share of the points one draw of the model classifies correctly (torchattacks' APGD
    /// attacks only those; atop attacks all).
    first_draw_correct: Option<f64>,
}

fn attacks(args: AttackBenchArgs, global: &Global) -> Result<()> {
    use atop::attacks::{AttackName, AttackSettings, Budget, Norm};
    use atop::models::checkpoint::{self, Sidecar};
    use atop::models::{Arch, Classifier, Model, ModelSpec, dataset_normalisation};
    use tch::{Kind, Tensor};

    use atop::models::pipeline::{Pipeline, Stage};
    use atop::transforms::{Resolution, TransformConfig, TransformKind, TransformStage};

    if args.batch == 0 || args.batches == 0 || args.pgd_steps == 0 || args.apgd_steps == 0 {
        anyhow::bail!(
            "--batch, --batches, --pgd-steps and --apgd-steps must be at least 1 (got {}, {}, {}, {})",
            args.batch,
            args.batches,
            args.pgd_steps,
            args.apgd_steps
        );
    }
    if args.eot == 0 {
        anyhow::bail!("--eot 0: expected at least 1 draw per step");
    }
    let noise = match args.noise {
        Some(sigma) => {
            let t = TransformConfig {
                sigma,
                ..TransformConfig::with_kind(TransformKind::Noise)
            };
            t.validate(None)
                .map_err(|e| anyhow::anyhow!("--noise {sigma}: {e}"))?;
            Some(t)
        }
        None => None,
    };
    let threads = atop::runtime::threads();
    let tmp = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for name in &args.arch {
        let arch: Arch = name.parse().map_err(anyhow::Error::msg)?;
        let (mean, std) = dataset_normalisation(DatasetKind::Cifar10);
        tch::manual_seed(0);
        let model = Classifier::new(ModelSpec::new(arch, 10, mean, std)?, global.device);
        let ckpt = tmp.path().join(name);
        let classes = (0..10).map(|i| i.to_string()).collect();
        checkpoint::save(
            &model,
            &Sidecar::new(
                model.spec.clone(),
                None,
                classes,
                None,
                serde_json::json!({}),
            ),
            &ckpt,
        )?;
        let n = (args.batch * args.batches) as i64;
        let x = Tensor::rand([n, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        // Labels = the model's own predictions, so every point starts correctly classified and
        // neither side skips any (torchattacks' APGD only attacks correct points).
        let y = tch::no_grad(|| model.logits(&x.to_device(global.device)))
            .argmax(-1, false)
            .to_device(tch::Device::Cpu);
        let data = tmp.path().join(format!("{name}.safetensors"));
        Tensor::write_safetensors(&[("x", &x), ("y", &y)], &data)?;
        let eps = 8.0 / 255.0;
        let stages: Vec<Box<dyn Stage>> = noise
            .iter()
            .map(|t| {
                Box::new(TransformStage {
                    transform: t.clone(),
                    resolution: Resolution::default(),
                }) as Box<dyn Stage>
            })
            .collect();
        let defended = Pipeline {
            stages,
            model: &model,
        };
        let timed_attacks: &[(AttackName, usize)] = if args.eot > 1 {
            &[(AttackName::ApgdCe, args.apgd_steps)]
        } else {
            &[
                (AttackName::Pgd, args.pgd_steps),
                (AttackName::ApgdCe, args.apgd_steps),
            ]
        };
        for &(attack, steps) in timed_attacks {
            let mut s = AttackSettings::new(Budget::new(Norm::Linf, eps)?);
            s.steps = Some(steps);
            s.step_size = Some(2.0 / 255.0);
            s.eot = args.eot;
            let a = s.build(attack)?;
            let mut ours = || -> Result<f64> {
                let t = Instant::now();
                for b in 0..args.batches as i64 {
                    let len = args.batch as i64;
                    let xb = x.narrow(0, b * len, len).to_device(global.device);
                    let yb = y.narrow(0, b * len, len).to_device(global.device);
                    let _ = a.run(&defended, &xb, &yb, 0)?;
                }
                synchronize(global.device);
                Ok(n as f64 / t.elapsed().as_secs_f64())
            };
            let reference = !args.no_reference && global.device == tch::Device::Cpu;
            let mut first_draw_correct = None;
            let mut theirs = || -> Result<f64> {
                let (img_s, first) = torchattacks_timing(
                    &ckpt,
                    &data,
                    attack,
                    steps,
                    (args.batch, threads),
                    (args.noise, args.eot),
                )?;
                first_draw_correct = first;
                Ok(img_s)
            };
            let timing = alternate(args.rounds, reference, &mut ours, &mut theirs)?;
            rows.push(AttackRow {
                arch: name.clone(),
                attack: match (args.noise, args.eot) {
                    (None, 1) => format!("{attack}-{steps}"),
                    (sigma, eot) => format!(
                        "{attack}-{steps} eot {eot}{}",
                        sigma.map_or(String::new(), |s| format!(" noise {s}"))
                    ),
                },
                images: n as usize,
                threads,
                atop_img_s: timing.ours,
                torchattacks_img_s: timing.theirs,
                ratio: timing.ratio,
                rounds: args.rounds,
                first_draw_correct,
            });
        }
    }
    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "device {:?}, threads {threads}, linf eps 8/255, f32, medians of {} alternating rounds",
        global.device, args.rounds
    );
    println!(
        "{:<20} {:<32} {:>7} {:>12} {:>14} {:>7}",
        "arch", "attack", "images", "atop img/s", "torchatt img/s", "ratio"
    );
    for r in &rows {
        println!(
            "{:<20} {:<32} {:>7} {:>12.2} {:>14} {:>7}",
            r.arch,
            r.attack,
            r.images,
            r.atop_img_s,
            r.torchattacks_img_s
                .map_or("-".into(), |v| format!("{v:.2}")),
            r.ratio.map_or("-".into(), |v| format!("{v:.2}")),
        );
    }
    if let Some(f) = rows
        .iter()
        .filter_map(|r| r.first_draw_correct)
        .reduce(f64::min)
        && f < 1.0
    {
        println!(
            "note: one draw of the model classified {:.1} % of the points correctly; torchattacks' APGD attacks only those, atop all of them",
            100.0 * f
        );
    }
    Ok(())
}

/// Runs bench/reference/attacks_reference.py (torchattacks) on the same checkpoint and images.
fn torchattacks_timing(
    ckpt: &std::path::Path,
    data: &std::path::Path,
    attack: atop::attacks::AttackName,
    steps: usize,
    (batch, threads): (usize, usize),
    (noise, eot): (Option<f64>, usize),
) -> Result<(f64, Option<f64>)> {
    use anyhow::Context;
    let (script, mut cmd) = reference_script("attacks_reference.py");
    cmd.arg("--model")
        .arg(ckpt)
        .arg("--data")
        .arg(data)
        .args(["--attack", &attack.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--eps", &(8.0f64 / 255.0).to_string()])
        .args(["--alpha", &(2.0f64 / 255.0).to_string()])
        .args(["--batch", &batch.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--eot", &eot.to_string()]);
    if let Some(sigma) = noise {
        cmd.args(["--noise", &sigma.to_string()]);
    }
    let out = run_reference(&script, &mut cmd)?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}: unexpected output", script.display()))?;
    let img_s = v["img_per_s"]
        .as_f64()
        .context("no img_per_s in the reference output")?;
    Ok((img_s, v["first_draw_correct"].as_f64()))
}

/// `bench/reference/<name>` and a command running it with the venv's Python.
fn reference_script(name: &str) -> (std::path::PathBuf, std::process::Command) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench/reference")
        .join(name);
    let mut cmd = std::process::Command::new(atop::runtime::venv_python());
    cmd.arg(&script);
    (script, cmd)
}

/// Runs a reference script; a failure to start or a non-zero exit is an error naming it.
fn run_reference(
    script: &std::path::Path,
    cmd: &mut std::process::Command,
) -> Result<std::process::Output> {
    use anyhow::Context;
    let out = cmd.output().with_context(|| {
        format!(
            "cannot run {} (run scripts/setup.sh, or pass --no-reference)",
            atop::runtime::venv_python().display()
        )
    })?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn device(args: DeviceBenchArgs, global: &Global) -> Result<()> {
    use atop::eval::device::{DeviceCheckSettings, OnBoth, compare};
    use atop::models::checkpoint;
    let dev = global.device;
    if dev == tch::Device::Cpu {
        // Still useful: it checks the check, since the CPU against itself must agree exactly.
        tracing::warn!(
            "no accelerator (--device {dev:?}; libtorch sees {} CUDA device(s)): comparing the CPU with itself",
            tch::Cuda::device_count()
        );
    }
    let dir = checkpoint::resolve(&args.model)?;
    let (cpu, sidecar) = checkpoint::load(&dir, tch::Device::Cpu)?;
    let (on_dev, _) = checkpoint::load(&dir, dev)?;
    let (_, data) = args.data.load_for(&sidecar, &dir)?;
    let indices = atop::data::subset::seeded_subset(data.len(), args.n, args.seed)?;
    let (x, y) = data.tensors(&indices);
    let preset = atop::train::purifier::TrainPurifierConfig::preset(&args.purifier_preset)?;
    let settings = DeviceCheckSettings {
        device: dev,
        purifier: preset.purifier,
        transform: preset.transform,
        purifier_images: args.purifier_images as i64,
        pgd_steps: args.pgd_steps,
        eps: args.eps,
        seed: args.seed,
    };
    let checks = compare(
        OnBoth {
            cpu,
            device: on_dev,
        },
        &x,
        &y,
        &settings,
    )?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        println!(
            "{dev:?} against the CPU ({}, {} threads), f32, {} of {} {} images (seed {}), classifier {}",
            atop::runtime::cpu_model(),
            atop::runtime::threads(),
            args.n,
            data.len(),
            args.data.split.as_str(),
            args.seed,
            dir.display()
        );
        println!(
            "{:<46} {:>6} {:>10} {:>10} {:>11} {:>11}  result",
            "step", "images", "difference", "agreement", "cpu ms/img", "dev ms/img"
        );
        for c in &checks {
            let limit = |l: Option<f64>, op: &str| l.map_or("-".into(), |l| format!("{op} {l}"));
            println!(
                "{:<46} {:>6} {:>10} {:>10} {:>11.3} {:>11.3}  {}",
                c.step,
                c.images,
                c.difference.map_or("-".into(), |v| format!("{v:.2e}")),
                c.agreement.map_or("-".into(), |v| format!("{v:.4}")),
                c.cpu_ms_per_image,
                c.device_ms_per_image,
                if c.passed { "agrees" } else { "DISAGREES" }
            );
            println!(
                "  {}; limits: difference {}, agreement {}; {}",
                c.compared,
                limit(c.max_difference, "<="),
                limit(c.min_agreement, ">="),
                c.detail
            );
        }
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.step.as_str())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} steps disagree between {dev:?} and the CPU: {}",
            failed.len(),
            checks.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
