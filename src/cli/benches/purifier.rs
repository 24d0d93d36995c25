//! `atop bench purifier`: purifier training steps on the resolution pipeline, side by side with
//! their PyTorch twin, and the cost of one whole-model attack step through it.

use super::*;
use atop::bench::purifier::{self, AeSetup, PresetSetup, PurifierBench, Setup};
use atop::purifier::ae::AeConfig;
use atop::purifier::{GanConfig, PurifierConfig};
use atop::transforms::TransformConfig;

pub(super) fn purifier(args: PurifierBenchArgs, global: &Global) -> Result<()> {
    // The presets' purifiers, each kind beside its own twin, or one GAN per width with the
    // architecture and transform flags, or (--ae) the AE at its default settings.
    let mut setups = Vec::new();
    let mut aes = Vec::new();
    for name in &args.preset {
        match purifier::preset_setup(name)? {
            PresetSetup::Gan(s) => setups.push(s),
            PresetSetup::Ae(a) => aes.push(a),
        }
    }
    if !setups.is_empty() && !aes.is_empty() {
        anyhow::bail!(
            "`--preset`: {} and {} are purifiers of two kinds, timed against two different PyTorch twins: time each kind in its own call",
            setups[0].name,
            aes[0].name
        );
    }
    if args.ae {
        aes.push(AeSetup {
            name: "AE (default settings)".into(),
            config: AeConfig::default(),
            mask_ratio: TransformConfig::default().missing_rate,
            work_size: None,
        });
    }
    if !aes.is_empty() {
        return ae(&args, aes, global);
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

fn ae(args: &PurifierBenchArgs, setups: Vec<AeSetup>, global: &Global) -> Result<()> {
    let rows = setups
        .into_iter()
        .map(|setup| {
            purifier::run_ae(&purifier::AeBench {
                setup,
                batch: args.batch,
                size: args.size,
                steps: args.steps,
                warmup: args.warmup,
                rounds: args.rounds,
                reference: !args.no_reference,
                device: global.device,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "AE purifier training step (visible patches of noisy images, every patch reconstructed, squared error, backward), device {:?}, threads {}, batch {}, {} timed steps, medians of {} alternating rounds",
        global.device,
        atop::runtime::threads(),
        args.batch,
        args.steps,
        args.rounds.max(1)
    );
    for row in &rows {
        println!(
            "{} ({} parameters, {} px images): {}; atop {:.2} img/s, PyTorch {}, ratio {}",
            row.name,
            row.parameters,
            row.size,
            row.purifier,
            row.atop_img_s,
            row.pytorch_img_s
                .map_or("-".into(), |v| format!("{v:.2} img/s")),
            row.ratio.map_or("-".into(), |v| format!("{v:.2}")),
        );
    }
    Ok(())
}
