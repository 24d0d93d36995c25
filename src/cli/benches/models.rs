//! `atop bench models`: classifier inference and training img/s, side by side with PyTorch.

use super::*;
use atop::bench::models::{self, ModelBench};

pub(super) fn models(args: ModelBenchArgs, global: &Global) -> Result<()> {
    let threads = atop::runtime::threads();
    let rows = models::run(&ModelBench {
        arch: args.arch.clone(),
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        reference: !args.no_reference,
        image_size: args.image_size,
        precision: args.precision,
        device: global.device,
    })?;
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
