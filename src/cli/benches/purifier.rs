//! `atop bench purifier`: purifier training steps on the resolution pipeline, side by side with
//! their PyTorch twin, and the cost of one whole-model attack step through it.

use super::*;
use atop::bench::purifier::{self, PurifierBench, Setup};
use atop::purifier::{GanConfig, PurifierConfig};
use atop::train::purifier::TrainPurifierConfig;
use atop::transforms::TransformConfig;

pub(super) fn purifier(args: PurifierBenchArgs, global: &Global) -> Result<()> {
    if args.ae {
        return ae(&args, global);
    }
    // The presets' purifiers, or one per width with the architecture and transform flags.
    let mut setups = Vec::new();
    for name in &args.preset {
        let cfg = TrainPurifierConfig::preset(name)?;
        setups.push(Setup {
            name: name.clone(),
            purifier: cfg
                .purifier
                .gan(&format!("`--preset {name}`: the PyTorch twin of `atop bench purifier` (for the AE: --ae)"))?
                .clone(),
            transform: cfg.transform,
        });
    }
    if args.preset.is_empty() {
        for &width in &args.width {
            let mut p: PurifierConfig = GanConfig {
                width,
                ..Default::default()
            }
            .into();
            p.apply(&args.arch.overrides())?;
            let p = p.gan("atop bench purifier")?.clone();
            let mut t = TransformConfig::default();
            args.transform.apply(&mut t);
            setups.push(Setup {
                name: format!("width {width}"),
                purifier: p,
                transform: t,
            });
        }
    }
    let device = global.device;
    let threads = atop::runtime::threads();
    let rows = purifier::run(&PurifierBench {
        setups,
        batch: args.batch,
        size: args.size,
        steps: args.steps,
        warmup: args.warmup,
        rounds: args.rounds,
        attack_batch: args.attack_batch,
        attack_steps: args.attack_steps,
        classifier_arch: args.classifier_arch,
        reference: !args.no_reference,
        device,
    })?;
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

fn ae(args: &PurifierBenchArgs, global: &Global) -> Result<()> {
    let row = purifier::run_ae(&purifier::AeBench {
        config: atop::purifier::ae::AeConfig::default(),
        mask_ratio: TransformConfig::default().missing_rate,
        batch: args.batch,
        size: args.size,
        steps: args.steps,
        warmup: args.warmup,
        rounds: args.rounds,
        reference: !args.no_reference,
        device: global.device,
    })?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&row)?);
        return Ok(());
    }
    println!(
        "AE purifier training step (visible patches of noisy images, every patch reconstructed, squared error, backward), device {:?}, threads {}, batch {}, {} px, {} timed steps, medians of {} alternating rounds",
        global.device,
        atop::runtime::threads(),
        row.batch,
        row.size,
        args.steps,
        row.rounds
    );
    println!(
        "{}: {} parameters; atop {:.2} img/s, PyTorch {}, ratio {}",
        row.purifier,
        row.parameters,
        row.atop_img_s,
        row.pytorch_img_s
            .map_or("-".into(), |v| format!("{v:.2} img/s")),
        row.ratio.map_or("-".into(), |v| format!("{v:.2}")),
    );
    Ok(())
}
