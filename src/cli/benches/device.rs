//! `atop bench device`: an accelerator against the CPU, step by step.

use super::*;

pub(super) fn device(args: DeviceBenchArgs, global: &Global) -> Result<()> {
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
