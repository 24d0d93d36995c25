//! `atop bench atop`: AToP fine-tuning steps, side by side with a PyTorch reference of the step.

use super::*;
use atop::bench::finetune::{self, AtopBench};
use atop::train::atop::TrainAtopConfig;
use atop::train::purifier::TrainPurifierConfig;

/// Times `FineTuner::step` (the trainer's own step) on random weights and images, and the
/// PyTorch reference of the same step with the same settings.
pub(super) fn atop_step(args: AtopBenchArgs, global: &Global) -> Result<()> {
    let device = global.device;
    let threads = atop::runtime::threads();
    let pre = TrainPurifierConfig::preset(&args.purifier_preset)?;
    let mut presets = Vec::new();
    for name in &args.preset {
        let mut cfg = TrainAtopConfig::preset(name)?;
        args.adversary.apply(&mut cfg.adversary);
        if let Some(b) = args.batch {
            cfg.batch_size = b;
        }
        presets.push((name.clone(), cfg));
    }
    let rows = finetune::run(&AtopBench {
        presets,
        purifier: pre.purifier,
        transform: pre.transform,
        steps: args.steps,
        warmup: args.warmup,
        rounds: args.rounds,
        classifier_arch: args.classifier_arch,
        reference: !args.no_reference,
        device,
    })?;
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
