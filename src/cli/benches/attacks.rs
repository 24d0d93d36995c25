//! `atop bench attacks`: PGD and APGD-CE img/s, side by side with torchattacks on the same weights.

use super::*;
use atop::attacks::{AttackName, AttackSettings, Budget, Norm};
use atop::models::checkpoint::{self, Sidecar};
use atop::models::pipeline::{Pipeline, Stage};
use atop::models::{Arch, Classifier, Model, ModelSpec, dataset_normalisation};
use atop::transforms::{Resolution, TransformConfig, TransformKind, TransformStage};
use tch::{Kind, Tensor};

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

pub(super) fn attacks(args: AttackBenchArgs, global: &Global) -> Result<()> {
    let noise = noise_stage(&args)?;
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
    print(&rows, &args, global, threads)
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

/// The rows as a table (or JSON).
fn print(
    rows: &[AttackRow],
    args: &AttackBenchArgs,
    global: &Global,
    threads: usize,
) -> Result<()> {
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
    for r in rows {
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

/// The checked sizes, and the Gaussian noise stage `--noise` puts in front of the classifier.
fn noise_stage(args: &AttackBenchArgs) -> Result<Option<TransformConfig>> {
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
    Ok(match args.noise {
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
    })
}
