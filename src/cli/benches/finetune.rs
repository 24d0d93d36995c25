//! `atop bench atop`: AToP fine-tuning steps, side by side with a PyTorch reference of the step.

use super::*;
use anyhow::{Context, bail};
use atop::purifier::{GanPurifier, PurifierConfig};
use atop::runtime::Precision;
use atop::train::atop::{
    AdversaryKind, AdversaryTarget, FineTuner, Reconstruction, TrainAtopConfig,
};
use atop::train::purifier::TrainPurifierConfig;
use atop::transforms::TransformConfig;
use tch::{Kind, Tensor};

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
pub(super) fn atop_step(args: AtopBenchArgs, global: &Global) -> Result<()> {
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
        let reference = !args.no_reference && device == tch::Device::Cpu;
        let mut pytorch_side =
            || pytorch_step(&cfg, &pcfg, &transform, &args, (n, side, threads), device);
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

/// Steps/s of the PyTorch reference of the same AToP step (bench/reference/atop_step.py):
/// `cfg`'s attack, losses and precision on the generator `pcfg`, `n` images of `side` px.
fn pytorch_step(
    cfg: &TrainAtopConfig,
    pcfg: &PurifierConfig,
    transform: &TransformConfig,
    args: &AtopBenchArgs,
    (n, side, threads): (i64, i64, usize),
    device: tch::Device,
) -> Result<f64> {
    let (steps, step_size, _) = cfg.adversary.schedule();
    let lr = cfg.generator_optimizer.lr;
    let precision = cfg.precision;
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
}
