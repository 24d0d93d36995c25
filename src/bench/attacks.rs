//! PGD and APGD-CE img/s, side by side with torchattacks on the same weights and images.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{alternate, random_classifier, reference_script, run_reference};
use crate::attacks::{AttackName, AttackSettings, Budget, Norm};
use crate::models::checkpoint::{self, Sidecar};
use crate::models::pipeline::{Pipeline, Stage};
use crate::models::{Arch, Model};
use crate::runtime::synchronize;
use crate::transforms::{Resolution, TransformConfig, TransformKind, TransformStage};

/// The budget both sides attack with: Linf at the default eps (8/255), step 2/255.
const EPS: f64 = crate::attacks::defaults::EPS;
const STEP: f64 = 2.0 / 255.0;

#[derive(Debug, Clone)]
pub struct AttackBench {
    /// Architectures (randomly initialised; both sides load the same weights).
    pub arch: Vec<String>,
    pub batch: usize,
    pub batches: usize,
    pub pgd_steps: usize,
    pub apgd_steps: usize,
    /// Gaussian noise of this sigma in front of the classifier (a randomized defence, drawn
    /// per image and pixel, on both sides).
    pub noise: Option<f64>,
    /// EOT draws per attack step; above 1 only APGD-CE is timed (torchattacks' PGD has none).
    pub eot: usize,
    /// Alternating rounds of atop and torchattacks timings; the medians are reported.
    pub rounds: usize,
    /// Time torchattacks too (on the CPU only).
    pub reference: bool,
    pub device: Device,
}

#[derive(Debug, Serialize)]
pub struct AttackRow {
    pub arch: String,
    pub attack: String,
    pub images: usize,
    pub threads: usize,
    pub atop_img_s: f64,
    pub torchattacks_img_s: Option<f64>,
    /// The median over rounds of atop / torchattacks, each round timing both back to back.
    pub ratio: Option<f64>,
    pub rounds: usize,
    /// Share of the points one draw of the model classifies correctly (torchattacks' APGD
    /// attacks only those; atop attacks all).
    pub first_draw_correct: Option<f64>,
}

pub fn run(b: &AttackBench) -> Result<Vec<AttackRow>> {
    let noise = noise_stage(b)?;
    let tmp = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for name in &b.arch {
        let arch: Arch = name.parse().map_err(anyhow::Error::msg)?;
        let model = random_classifier(arch, b.device)?;
        let ckpt = tmp.path().join(name);
        let classes = (0..10).map(|i| i.to_string()).collect();
        let sidecar = Sidecar::new(
            model.spec.clone(),
            None,
            classes,
            None,
            serde_json::json!({}),
        );
        checkpoint::save(&model, &sidecar, &ckpt)?;
        let n = (b.batch * b.batches) as i64;
        let x = Tensor::rand([n, 3, 32, 32], (Kind::Float, Device::Cpu));
        // Labels = the model's own predictions, so every point starts correctly classified and
        // neither side skips any (torchattacks' APGD only attacks correct points).
        let y = tch::no_grad(|| model.logits(&x.to_device(b.device)))
            .argmax(-1, false)
            .to_device(Device::Cpu);
        let data = tmp.path().join(format!("{name}.safetensors"));
        Tensor::write_safetensors(&[("x", &x), ("y", &y)], &data)?;
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
        let timed_attacks: &[(AttackName, usize)] = if b.eot > 1 {
            &[(AttackName::ApgdCe, b.apgd_steps)]
        } else {
            &[
                (AttackName::Pgd, b.pgd_steps),
                (AttackName::ApgdCe, b.apgd_steps),
            ]
        };
        for &(attack, steps) in timed_attacks {
            let mut s = AttackSettings::new(Budget::new(Norm::Linf, EPS)?);
            s.steps = Some(steps);
            s.step_size = Some(STEP);
            s.eot = b.eot;
            let a = s.build(attack)?;
            let mut ours = || -> Result<f64> {
                let t = Instant::now();
                for i in 0..b.batches as i64 {
                    let len = b.batch as i64;
                    let xb = x.narrow(0, i * len, len).to_device(b.device);
                    let yb = y.narrow(0, i * len, len).to_device(b.device);
                    let _ = a.run(&defended, &xb, &yb, 0)?;
                }
                synchronize(b.device);
                Ok(n as f64 / t.elapsed().as_secs_f64())
            };
            let reference = b.reference && b.device == Device::Cpu;
            let mut first_draw_correct = None;
            let mut theirs = || -> Result<f64> {
                let (img_s, first) = torchattacks_timing(&ckpt, &data, attack, steps, b)?;
                first_draw_correct = first;
                Ok(img_s)
            };
            let timing = alternate(b.rounds, reference, &mut ours, &mut theirs)?;
            rows.push(AttackRow {
                arch: name.clone(),
                attack: match (b.noise, b.eot) {
                    (None, 1) => format!("{attack}-{steps}"),
                    (sigma, eot) => format!(
                        "{attack}-{steps} eot {eot}{}",
                        sigma.map_or(String::new(), |s| format!(" noise {s}"))
                    ),
                },
                images: n as usize,
                threads: crate::runtime::threads(),
                atop_img_s: timing.ours,
                torchattacks_img_s: timing.theirs,
                ratio: timing.ratio,
                rounds: b.rounds,
                first_draw_correct,
            });
        }
    }
    Ok(rows)
}

/// Runs bench/reference/attacks_reference.py (torchattacks) on the same checkpoint and images.
fn torchattacks_timing(
    ckpt: &Path,
    data: &Path,
    attack: AttackName,
    steps: usize,
    b: &AttackBench,
) -> Result<(f64, Option<f64>)> {
    let (script, mut cmd) = reference_script("attacks_reference.py");
    cmd.arg("--model")
        .arg(ckpt)
        .arg("--data")
        .arg(data)
        .args(["--attack", &attack.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--eps", &EPS.to_string()])
        .args(["--alpha", &STEP.to_string()])
        .args(["--batch", &b.batch.to_string()])
        .args(["--threads", &crate::runtime::threads().to_string()])
        .args(["--eot", &b.eot.to_string()]);
    if let Some(sigma) = b.noise {
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

/// The checked sizes, and the Gaussian noise stage `noise` puts in front of the classifier.
fn noise_stage(b: &AttackBench) -> Result<Option<TransformConfig>> {
    if b.batch == 0 || b.batches == 0 || b.pgd_steps == 0 || b.apgd_steps == 0 {
        bail!(
            "`batch`, `batches`, `pgd_steps` and `apgd_steps` must be at least 1 (got {}, {}, {}, {})",
            b.batch,
            b.batches,
            b.pgd_steps,
            b.apgd_steps
        );
    }
    if b.eot == 0 {
        bail!("`eot` 0: expected at least 1 draw per step");
    }
    Ok(match b.noise {
        Some(sigma) => {
            let t = TransformConfig {
                sigma,
                ..TransformConfig::with_kind(TransformKind::Noise)
            };
            t.validate(None)
                .map_err(|e| anyhow::anyhow!("`noise` {sigma}: {e}"))?;
            Some(t)
        }
        None => None,
    })
}
