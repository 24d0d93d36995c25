//! `atop bench models`: classifier inference and training img/s, side by side with PyTorch.

use super::*;

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

pub(super) fn models(args: ModelBenchArgs, global: &Global) -> Result<()> {
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
