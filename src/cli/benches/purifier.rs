//! `atop bench purifier`: purifier training steps on the resolution pipeline, side by side with
//! their PyTorch twin, and the cost of one whole-model attack step through it.

use super::*;
use anyhow::{Context, bail};
use atop::models::Model;
use atop::models::pipeline::Pipeline;
use atop::purifier::defended::Purify;
use atop::purifier::{GanPurifier, PurifierConfig};
use atop::train::purifier::TrainPurifierConfig;
use atop::transforms::{TransformConfig, TransformKind};
use tch::{Kind, Tensor};

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

pub(super) fn purifier(args: PurifierBenchArgs, global: &Global) -> Result<()> {
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
        let mut pytorch_side = || pytorch_step(&cfg, &transform, work, &args, threads);
        let timing = alternate(
            args.rounds,
            reference,
            &mut || Ok(atop_side()),
            &mut pytorch_side,
        )?;
        // One whole-model attack step: the input gradient of the classifier's loss through
        // the defended model, at a small batch.
        let attack_s_per_img = (args.attack_batch > 0 && args.attack_steps > 0)
            .then(|| attack_step_seconds(&p, &transform, &args, device))
            .transpose()?;
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

/// img/s of the PyTorch twin of one purifier training step (bench/reference/purifier.py).
fn pytorch_step(
    cfg: &PurifierConfig,
    transform: &TransformConfig,
    work: i64,
    args: &PurifierBenchArgs,
    threads: usize,
) -> Result<f64> {
    let s = args.size;
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
}

/// Seconds per image of one whole-model attack step: the input gradient of the classifier's
/// loss through the defended model, at a small batch.
fn attack_step_seconds(
    p: &GanPurifier,
    transform: &TransformConfig,
    args: &PurifierBenchArgs,
    device: tch::Device,
) -> Result<f64> {
    let s = args.size;
    let (mean, std) = atop::models::dataset_normalisation(DatasetKind::Cifar10);
    let spec = atop::models::ModelSpec::new(args.classifier_arch, 10, mean, std)?;
    let classifier = atop::models::Classifier::new(spec, device);
    let pipeline = Pipeline {
        stages: vec![Box::new(Purify {
            purifier: p,
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
    Ok(secs / (args.attack_batch * args.attack_steps) as f64)
}
