//! The GAN purifier on real CIFAR-10: the generator and discriminator compute what their
//! PyTorch twin computes on the same weights; pre-training learns; a killed run resumes to the
//! same weights; divergence stops with the last good checkpoint kept; `atop purify` and
//! `atop attack --purifier` work end to end; bad input is a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use atop::purifier::{self, GanConfig, GanPurifier, Purifier, PurifierSidecar};
use atop::train::purifier::PurifierEpoch;
use atop::train::runlog;
use atop::transforms::{TransformConfig, TransformKind};
use common::*;
use tch::{Device, Kind, Tensor};

/// A small, fast pre-training run: width 8 on 1,024 CIFAR-10 images, 3 epochs of 32 steps,
/// with a cosine schedule and, in the last epoch, a light KL guidance through the test
/// classifier (given on the command line), so that resuming must also restore both.
const CONFIG: &str = r#"
epochs = 3
batch_size = 32
train_subset = 1024
eval_subset = 128
seed = 3
gan_weight = 0.1
kl_weight = 0.1
ce_after_epochs = 2
schedule = "cosine"
warmup_steps = 8
precision = "f32"
[generator_optimizer]
lr = 0.004
beta1 = 0.5
beta2 = 0.999
[discriminator_optimizer]
lr = 0.004
beta1 = 0.5
beta2 = 0.999
[data]
dataset = "cifar10"
[purifier]
width = 8
disc_width = 8
[transform]
kind = "rt2"
"#;

fn config_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = tempfile::tempdir().unwrap().keep().join("purifier.toml");
        std::fs::write(&path, CONFIG).unwrap();
        path
    })
}

fn train_cmd(out: &Path) -> Command {
    let mut cmd = atop();
    cmd.env("ATOP_DATA_DIR", data_dir())
        .args(["--quiet", "--threads", "2", "train", "purifier", "--config"])
        .arg(config_file())
        .arg("--classifier")
        .arg(classifier())
        .arg("--out")
        .arg(out);
    cmd
}

/// The uninterrupted reference run (a cached fixture, with the classifier's).
fn trained() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let key = format!("{CONFIG}\n{}", classifier().display());
        cached_fixture("purifier", &key, |dir| {
            run_ok(&mut train_cmd(dir));
        })
    })
}

/// A small classifier (WRN-10-1, 3,000 images, 2 epochs) for the purify and attack commands
/// (a cached fixture). Not the suite's `small_classifier`: trained at the default learning
/// rate it tolerates noise the way the working-size test below needs.
fn classifier() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let args = [
            "--json",
            "--threads",
            "2",
            "train",
            "classifier",
            "--dataset",
            "cifar10",
            "--arch",
            "wrn-10-1",
            "--epochs",
            "2",
            "--batch-size",
            "100",
            "--train-subset",
            "3000",
            "--test-subset",
            "200",
            "--out",
        ];
        cached_fixture("wrn-10-1-classifier", &args.join(" "), |dir| {
            run_json(atop().env("ATOP_DATA_DIR", data_dir()).args(args).arg(dir));
        })
    })
}

fn generator_weights(run: &Path) -> Vec<(String, Tensor)> {
    sorted_tensors(&purifier::resolve(run).unwrap().join(purifier::GENERATOR))
}

#[test]
fn generator_and_discriminator_agree_with_pytorch() {
    tch::manual_seed(11);
    let tmp = tempfile::tempdir().unwrap();
    let authors = GanConfig {
        width: 8,
        disc_width: 8,
        ..Default::default()
    };
    // The authors' layout with and without attention, and every trainability option at once.
    let cases = [
        (authors.clone(), 32),
        (
            GanConfig {
                attention: false,
                ..authors.clone()
            },
            64,
        ),
        (
            GanConfig {
                stages: 1,
                skips: true,
                group_norm: true,
                residual: true,
                ..authors.clone()
            },
            32,
        ),
    ];
    for (cfg, side) in cases {
        let attention = cfg.attention;
        let p = GanPurifier::new(cfg.clone(), Device::Cpu).unwrap();
        // Move the spectral-norm vectors away from their random start, as training would.
        let x = Tensor::rand([4, 3, side, side], (Kind::Float, Device::Cpu));
        let mask = TransformConfig::with_kind(TransformKind::Rt1)
            .sample(&x)
            .masks
            .remove(0);
        for _ in 0..3 {
            let _ = tch::no_grad(|| p.discriminator.forward_t(&x, &mask, true));
        }
        let dir = tmp.path().join(format!("p{side}-{}", cfg.stages));
        let image = &x * 2.0 - 1.0;
        let (x1, x2) = tch::no_grad(|| p.generator.forward(&image, &mask));
        let d = tch::no_grad(|| p.discriminator.forward_t(&x2, &mask, false));
        Purifier::Gan(p)
            .save(
                &dir,
                &PurifierSidecar::new(cfg.clone().into(), TransformConfig::default()),
            )
            .unwrap();
        let data = dir.join("in.safetensors");
        Tensor::write_safetensors(&[("image", &image), ("mask", &mask)], &data).unwrap();
        let out = dir.join("out.safetensors");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/reference/purifier.py");
        let mut cmd = Command::new(atop::runtime::venv_python());
        cmd.arg(script)
            .args(["forward", "--width", "8", "--disc-width", "8", "--weights"])
            .arg(dir.join(purifier::GENERATOR))
            .arg("--disc")
            .arg(dir.join(purifier::DISCRIMINATOR))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out);
        if !attention {
            cmd.arg("--no-attention");
        }
        cmd.args(["--stages", &cfg.stages.to_string()]);
        for (flag, on) in [
            ("--skips", cfg.skips),
            ("--group-norm", cfg.group_norm),
            ("--residual", cfg.residual),
        ] {
            cmd.args([flag, if on { "1" } else { "0" }]);
        }
        let res = cmd.output().unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let theirs = Tensor::read_safetensors(&out).unwrap();
        let get = |name: &str| {
            theirs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .unwrap()
        };
        for (name, ours) in [("x1", &x1), ("x2", &x2), ("d", &d)] {
            let diff = (ours - get(name)).abs().max().double_value(&[]);
            eprintln!(
                "{}, {side} px, {name}: max |atop - pytorch| = {diff:.2e}",
                cfg.describe()
            );
            assert!(diff < 1e-4, "{name} differs from PyTorch by {diff}");
        }
    }
}

#[test]
fn killed_run_resumes_to_the_same_weights_and_the_purifier_learns() {
    let a = trained();
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    let killed_at = kill_after_first_checkpoint(&mut train_cmd(&b), &b);
    assert!(killed_at < 3, "the run finished before the kill");
    let json = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["--json", "train", "purifier", "--resume"])
            .arg(&b),
    );
    assert_eq!(json["resumed_from_epoch"], killed_at);
    assert_eq!(last_epoch(&b), Some(3));
    for ((na, ta), (nb, tb)) in generator_weights(a).iter().zip(&generator_weights(&b)) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resuming");
    }

    // It learns: the purified images get closer to the clean ones than the transformed input
    // (noise 0.25 and a quarter of the image grey), and closer than after the first epoch.
    let m: Vec<PurifierEpoch> = runlog::read(a).unwrap();
    assert_eq!(m.len(), 3);
    assert!(m[2].g_l1 < m[0].g_l1, "{m:?}");
    assert!(m[2].psnr > m[0].psnr, "{m:?}");
    // The guidance (KL to the classifier's clean prediction) starts after two epochs of plain
    // reconstruction, and accuracies are logged.
    assert!(m[0].g_kl == 0.0 && m[1].g_kl == 0.0, "{m:?}");
    assert!(m[2].g_kl > 0.0 && m[2].g_kl.is_finite(), "{m:?}");
    assert!(
        m.iter()
            .all(|e| e.purified_acc.is_some() && e.clean_acc.is_some())
    );
    let noisy = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["--json", "purify", "--n", "128", "--purifier"])
            .arg(a)
            .arg("--out")
            .arg(tmp.path().join("purify")),
    );
    let r = &noisy["results"][0];
    let (psnr, before) = (
        r["psnr"].as_f64().unwrap(),
        r["transformed_psnr"].as_f64().unwrap(),
    );
    eprintln!(
        "PSNR per epoch {:?}; purify: {psnr:.2} dB vs transformed {before:.2} dB",
        m.iter().map(|e| e.psnr).collect::<Vec<_>>()
    );
    assert!(
        psnr > before + 2.0,
        "purified {psnr} dB, transformed input {before} dB"
    );
    assert!(a.join("samples/epoch-0003.png").is_file());

    // A finished run is never overwritten by a fresh one.
    let out = train_cmd(a).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a training run"));

    // Divergence stops, names the step and keeps the last good checkpoint.
    let out = atop()
        .env("ATOP_DATA_DIR", data_dir())
        .args([
            "--quiet", "train", "purifier", "--epochs", "4", "--lr", "1e30", "--resume",
        ])
        .arg(&b)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("diverged") && err.contains("epoch 4 step") && err.contains("epoch-0003"),
        "{err}"
    );
    assert_eq!(last_epoch(&b), Some(3));
    for ((_, ta), (_, tb)) in generator_weights(a).iter().zip(&generator_weights(&b)) {
        assert!(ta.equal(tb), "the kept checkpoint changed");
    }
}

#[test]
fn purify_reports_quality_and_accuracy_for_each_transform() {
    let tmp = tempfile::tempdir().unwrap();
    let json = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args([
                "--json",
                "purify",
                "--transform",
                "rt1,rt2,rt3,none",
                "--n",
                "64",
                "--purifier",
            ])
            .arg(trained())
            .arg("--classifier")
            .arg(classifier())
            .arg("--out")
            .arg(tmp.path().join("p")),
    );
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for r in results {
        let kind = r["transform"]["kind"].as_str().unwrap();
        assert_eq!(r["n"], 64);
        for key in [
            "psnr",
            "ssim",
            "clean_accuracy",
            "transformed_accuracy",
            "purified_accuracy",
        ] {
            assert!(r[key].as_f64().unwrap().is_finite(), "{kind}: {key}");
        }
        assert!(Path::new(r["grid"].as_str().unwrap()).is_file());
        let images = Tensor::read_safetensors(r["images"].as_str().unwrap()).unwrap();
        assert_eq!(images[0].1.size(), [64, 3, 32, 32]);
    }
    // Same classifier, same images: one clean accuracy.
    assert_eq!(results[0]["clean_accuracy"], results[3]["clean_accuracy"]);
    // No transform: the "transformed" images are the clean ones.
    assert_eq!(
        results[3]["transformed_accuracy"],
        results[3]["clean_accuracy"]
    );

    // A folder of images: outputs keep their names.
    let input = tmp.path().join("in");
    write(&input.join("a.png"), &png_bytes(&pattern(32, 32, 0)));
    write(&input.join("b.jpg"), &jpeg_bytes(&pattern(32, 32, 40)));
    let json = run_json(
        atop()
            .args(["--json", "purify", "--transform", "rt2", "--purifier"])
            .arg(trained())
            .arg("--input")
            .arg(&input)
            .arg("--out")
            .arg(tmp.path().join("q")),
    );
    assert_eq!(json["results"][0]["n"], 2);
    assert!(tmp.path().join("q/rt2/a.png").is_file() && tmp.path().join("q/rt2/b.png").is_file());
}

#[test]
fn a_classifier_behind_a_transform_alone_is_evaluated_at_the_working_size() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = |extra: &[&str]| {
        run_json(
            atop()
                .env("ATOP_DATA_DIR", data_dir())
                .args(["--json", "eval", "clean", "--subset", "500", "--model"])
                .arg(classifier())
                .args(extra)
                .arg("--out")
                .arg(tmp.path()),
        )
    };
    let clean = eval(&[]);
    let native = eval(&["--transform", "noise", "--sigma", "0.25"]);
    let fine = eval(&[
        "--transform",
        "noise",
        "--sigma",
        "0.25",
        "--work-size",
        "128",
    ]);
    let acc = |v: &serde_json::Value| v["accuracy"].as_f64().unwrap();
    eprintln!(
        "clean {:.3}, noise 0.25 at 32 px {:.3}, at 128 px {:.3}",
        acc(&clean),
        acc(&native),
        acc(&fine)
    );
    // Noise drawn at 128 px is averaged over 4x4 pixels on the way back: a quarter of the
    // spread, so the classifier keeps more of its accuracy.
    assert!(acc(&native) < acc(&fine) && acc(&fine) <= acc(&clean) + 0.02);
    assert_eq!(
        fine["defence"],
        "noise(sigma=0.25) at 128 px (bilinear up, area down) -> wrn-10-1"
    );
    // Each evaluation keeps its own file.
    for v in [&clean, &native, &fine] {
        assert!(Path::new(v["json"].as_str().unwrap()).is_file());
    }
    assert_ne!(native["json"], fine["json"]);
    assert_ne!(clean["json"], native["json"]);
}

#[test]
fn attacks_differentiate_through_the_purifier_or_around_it() {
    let tmp = tempfile::tempdir().unwrap();
    let attack = |extra: &[&str], out: &str| {
        run_json(
            atop()
                .env("ATOP_DATA_DIR", data_dir())
                .args([
                    "--json", "attack", "--attack", "pgd", "--steps", "5", "--eps", "8/255", "--n",
                    "24", "--eot", "2", "--model",
                ])
                .arg(classifier())
                .arg("--purifier")
                .arg(trained())
                .args(extra)
                .arg("--out")
                .arg(tmp.path().join(out)),
        )
    };
    for (extra, out) in [(&[][..], "exact"), (&["--bpda"][..], "bpda")] {
        let r = attack(extra, out);
        let defence = r["defence"].as_str().unwrap();
        assert!(
            defence.contains("rt2") && defence.contains("gan-purifier(c=8, at the image's size)"),
            "{defence}"
        );
        assert_eq!(defence.starts_with("bpda("), out == "bpda", "{defence}");
        let step = &r["steps"][0];
        // Gradients reach the input through transform, generator and classifier.
        assert_eq!(step["grad"]["zero"], 0, "{step}");
        assert!(step["warning"].is_null(), "{step}");
        assert!(r["robust_accuracy"].as_f64().unwrap() <= r["clean_accuracy"].as_f64().unwrap());
    }
}

#[test]
fn bad_purifier_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let train_err = |args: &[&str]| {
        let out = atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["train", "purifier", "--preset", "purifier-demo"])
            .args(args)
            .arg("--out")
            .arg(tmp.path().join("never"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for (args, expected) in [
        (&["--width", "30"][..], "multiple of 4"),
        (&["--sigma=-0.5"][..], "sigma = -0.5"),
        (&["--missing-rate", "1.5"][..], "strictly between 0 and 1"),
        (
            &["--transform", "rt3", "--pieces", "3"][..],
            "divisor of 64",
        ),
        (&["--work-size", "100"][..], "multiple of 8"),
        (&["--work-size", "16"][..], "smaller than the 32x32 images"),
        (
            &["--work-size", "36", "--stages", "1"][..],
            "not divisible by the transform grid 8",
        ),
        (&["--stages", "3"][..], "1 or 2"),
        (&["--ce-weight", "0.1"][..], "needs a classifier"),
        (
            &["--kl-weight", "0.1"][..],
            "kl_weight = 0.1 needs a classifier",
        ),
        (
            &["--warmup-steps", "10", "--schedule", "bogus"][..],
            "bogus",
        ),
        (
            &["--image-size", "36", "--dataset", "imagenette"][..],
            "not divisible by 8",
        ),
    ] {
        let err = train_err(args);
        assert!(
            err.contains(expected),
            "{args:?}: expected '{expected}' in: {err}"
        );
    }
    // A checkpoint whose description disagrees with its weights (another width).
    let ckpt = purifier::resolve(trained()).unwrap();
    let copy = tmp.path().join("wrong-width");
    std::fs::create_dir_all(&copy).unwrap();
    for f in [purifier::GENERATOR, purifier::DISCRIMINATOR] {
        std::fs::copy(ckpt.join(f), copy.join(f)).unwrap();
    }
    let sidecar = std::fs::read_to_string(ckpt.join(purifier::SIDECAR)).unwrap();
    std::fs::write(
        copy.join(purifier::SIDECAR),
        sidecar.replace("\"width\": 8", "\"width\": 12"),
    )
    .unwrap();
    let out = atop()
        .args(["purify", "--n", "4", "--purifier"])
        .arg(&copy)
        .env("ATOP_DATA_DIR", data_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has shape") && err.contains("c=12"),
        "{err}"
    );
    // A working size other than the one it was trained at; a resumed run that would change it.
    let out = atop()
        .args(["purify", "--n", "4", "--work-size", "64", "--purifier"])
        .arg(trained())
        .env("ATOP_DATA_DIR", data_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not at the requested work size 64"),
        "{err}"
    );
    let out = atop()
        .args(["train", "purifier", "--work-size", "64", "--resume"])
        .arg(trained())
        .env("ATOP_DATA_DIR", data_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a resumed run keeps its purifier"),
        "{err}"
    );
    // Not a purifier at all.
    let out = atop()
        .args(["purify", "--purifier"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("purifier.json"));
    // Images whose side the generator cannot halve three times.
    let input = tmp.path().join("odd");
    write(&input.join("x.png"), &png_bytes(&pattern(36, 36, 1)));
    let out = atop()
        .args(["purify", "--purifier"])
        .arg(trained())
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not divisible by 8"));
}

fn atop_cmd(out: &Path) -> Command {
    let mut cmd = atop();
    cmd.env("ATOP_DATA_DIR", data_dir())
        .args([
            "--quiet",
            "--threads",
            "2",
            "train",
            "atop",
            "--preset",
            "atop-demo",
            "--epochs",
            "3",
            "--train-subset",
            "256",
            "--eval-subset",
            "16",
            "--eval-steps",
            "2",
            "--eval-eot",
            "1",
            "--adversary",
            "pgd",
            "--adversary-target",
            "defended",
            "--adversary-steps",
            "2",
            // With a weight average: the resume must restore it as well as the live weights.
            "--ema-decay",
            "0.9",
            "--classifier",
        ])
        .arg(classifier())
        .arg("--purifier")
        .arg(trained())
        .arg("--out")
        .arg(out);
    cmd
}

/// A resumed AToP run continues only on the inputs and settings it began with: other weights
/// at its classifier's recorded path, or another lambda, are refused by name; more epochs are
/// a change recorded from the epoch it resumed after.
#[test]
fn a_resumed_atop_run_keeps_its_inputs_and_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let cls = tmp.path().join("classifier");
    std::fs::create_dir(&cls).unwrap();
    let src = atop::models::checkpoint::resolve(classifier()).unwrap();
    for f in ["model.safetensors", "model.json"] {
        std::fs::copy(src.join(f), cls.join(f)).unwrap();
    }
    let pur = tmp.path().join("pur");
    let copy_purifier = |to: &Path| {
        std::fs::create_dir(to).unwrap();
        let from = purifier::resolve(trained()).unwrap();
        for e in std::fs::read_dir(&from).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    };
    copy_purifier(&pur);
    // Started with paths relative to its working directory: recorded absolute.
    let run = tmp.path().join("run");
    run_ok(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .current_dir(tmp.path())
            .args([
                "--quiet",
                "--threads",
                "2",
                "train",
                "atop",
                "--preset",
                "atop-demo",
            ])
            .args([
                "--epochs",
                "1",
                "--train-subset",
                "64",
                "--eval-subset",
                "8",
            ])
            .args(["--eval-steps", "1", "--eval-eot", "1"])
            .args([
                "--classifier",
                "classifier",
                "--purifier",
                "pur",
                "--out",
                "run",
            ]),
    );
    let resume = |extra: &[&str]| {
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["--quiet", "train", "atop", "--resume"])
            .arg(&run)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = |extra: &[&str], expect: &str| {
        let out = resume(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect),
            "{extra:?}: {err}"
        );
    };
    refused(
        &["--lambda", "0.9", "--epochs", "2"],
        "--lambda was 0.1 when the run started, now 0.9",
    );
    let weights = cls.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let other: Vec<(String, Tensor)> = Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = if t.is_floating_point() { t + 0.01 } else { t };
            (n, t)
        })
        .collect();
    Tensor::write_safetensors(&other, &weights).unwrap();
    refused(
        &["--epochs", "2"],
        "input --classifier changed since the run started",
    );
    std::fs::write(&weights, original).unwrap();
    run_ok(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["--quiet", "train", "atop", "--resume"])
            .arg(&run)
            .args(["--epochs", "2"]),
    );
    let changes: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("changes.json")).unwrap()).unwrap();
    assert_eq!(changes[0]["setting"], "epochs");
    assert_eq!(
        (changes[0]["was"].clone(), changes[0]["now"].clone()),
        (1.into(), 2.into())
    );
    assert_eq!(changes[0]["after_epoch"], 1);

    // Interpolated from another working directory that holds another `pur`: the start is the
    // one the run recorded (absolute), not the decoy of the same relative name.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    copy_purifier(&other.join("pur"));
    let g = other.join("pur/generator.safetensors");
    let moved: Vec<(String, Tensor)> = Tensor::read_safetensors(&g)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, if t.is_floating_point() { t + 0.01 } else { t }))
        .collect();
    Tensor::write_safetensors(&moved, &g).unwrap();
    let mixed = tmp.path().join("mixed");
    run_ok(
        atop()
            .current_dir(&other)
            .args([
                "--quiet",
                "purifier",
                "interpolate",
                "--alpha",
                "0.5",
                "--tuned",
            ])
            .arg(&run)
            .arg("--out")
            .arg(&mixed),
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mixed.join(purifier::SIDECAR)).unwrap())
            .unwrap();
    let start = &sidecar["interpolation"]["start"];
    assert_eq!(start.as_str().unwrap(), pur.to_str().unwrap(), "{sidecar}");
    assert!(
        sidecar["interpolation"]["start_sha256"].is_string(),
        "{sidecar}"
    );
}

#[test]
fn atop_fine_tuning_resumes_to_the_same_weights_and_checks_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run_ok(&mut atop_cmd(&a));
    let killed_at = kill_after_first_checkpoint(&mut atop_cmd(&b), &b);
    assert!(killed_at < 3, "the run finished before the kill");
    let json = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["--json", "train", "atop", "--resume"])
            .arg(&b),
    );
    assert_eq!(json["resumed_from_epoch"], killed_at);
    assert!(
        json["adversary"]
            .as_str()
            .unwrap()
            .contains("whole defended model"),
        "{json}"
    );
    // The exported (averaged) generator and the live one.
    let live = |run: &Path| -> Vec<(String, Tensor)> {
        let file = purifier::resolve(run)
            .unwrap()
            .join("generator-live.safetensors");
        let mut w = sorted_tensors(&file);
        let updates = w.iter().position(|(k, _)| k == "ema.updates").unwrap();
        let (_, n) = w.remove(updates);
        assert!(n.int64_value(&[0]) > 0, "no average update recorded");
        w
    };
    for (wa, wb) in [
        (generator_weights(&a), generator_weights(&b)),
        (live(&a), live(&b)),
    ] {
        for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na} differs after resuming");
        }
    }
    assert_eq!(generator_weights(&a).len(), live(&a).len());
    assert!(
        generator_weights(&a)
            .iter()
            .zip(&live(&a))
            .any(|((_, avg), (_, w))| !avg.equal(w)),
        "the exported generator is the live one: no average"
    );
    // Every epoch records every term and the three accuracies; plots, grids and the
    // fine-tuning provenance are written.
    let m: Vec<serde_json::Value> = runlog::read(&a).unwrap();
    assert_eq!(m.len(), 3);
    for e in &m {
        for key in [
            "d_loss",
            "g_gan",
            "g_l1",
            "g_ce",
            "g_kl",
            "train_adv_acc",
            "clean_acc",
            "defended_clean_acc",
            "robust_acc",
            "transfer_acc",
            "lr",
            "img_per_s",
        ] {
            assert!(e[key].as_f64().unwrap().is_finite(), "{key} in {e}");
        }
        assert!(e["robust_acc"].as_f64() <= e["defended_clean_acc"].as_f64());
        let live = &e["live"];
        for key in ["defended_clean_acc", "robust_acc", "transfer_acc"] {
            assert!(live[key].as_f64().unwrap().is_finite(), "live {key} in {e}");
        }
    }
    assert!(a.join("curves.png").is_file() && a.join("samples/epoch-0003.png").is_file());
    // The fine-tuned purifier is a purifier like any other: its description, and `atop purify`.
    let sidecar = |run: &Path| -> serde_json::Value {
        let dir = purifier::resolve(run).unwrap();
        serde_json::from_str(&std::fs::read_to_string(dir.join(purifier::SIDECAR)).unwrap())
            .unwrap()
    };
    let purifies = |run: &Path, n: usize| {
        let out = tmp.path().join(format!("purify-{n}"));
        let r = run_json(
            atop()
                .env("ATOP_DATA_DIR", data_dir())
                .args(["--json", "purify", "--n", &n.to_string(), "--purifier"])
                .arg(run)
                .arg("--out")
                .arg(out),
        );
        assert_eq!(r["results"][0]["n"], n);
    };
    assert_eq!(sidecar(&a)["fine_tuning"]["lambda"], 0.1);
    assert_eq!(sidecar(&a)["fine_tuning"]["ema_decay"], 0.9);
    purifies(&a, 16);
    // Its live weights load by naming their file, wherever a purifier is taken.
    let live_file = purifier::resolve(&a)
        .unwrap()
        .join("generator-live.safetensors");
    let (p, _) = purifier::load(&live_file, tch::Device::Cpu).unwrap();
    let loaded = p.weights().variables();
    for (k, w) in live(&a) {
        assert!(loaded[&k].equal(&w), "{k}: not the live weights");
    }
    purifies(&live_file, 12);
    let typo = live_file.with_file_name("generator-lvie.safetensors");
    let err = match purifier::load(&typo, tch::Device::Cpu) {
        Ok(_) => panic!("{} loaded", typo.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("generator-lvie.safetensors: no such file"),
        "{err}"
    );
    // Fine-tuned at twice the width: the checkpoint describes the wider generator.
    let wide = tmp.path().join("wide");
    run_ok(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["--quiet", "train", "atop", "--preset", "atop-demo"])
            .args(["--train-subset", "64", "--widen", "16", "--classifier"])
            .arg(classifier())
            .arg("--purifier")
            .arg(trained())
            .arg("--out")
            .arg(&wide),
    );
    assert_eq!(sidecar(&wide)["purifier"]["width"], 16);
    assert_eq!(sidecar(&wide)["fine_tuning"]["widen"], 16);
    purifies(&wide, 8);
    // Between the widened run and the purifier it started from (recorded in its description):
    // alpha 0 computes the start's function, 1 is the run's generator, 0.5 purifies.
    let interpolate = |alpha: &str, out: &Path| {
        atop()
            .args(["--quiet", "purifier", "interpolate", "--tuned"])
            .arg(&wide)
            .args(["--alpha", alpha, "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let at = |alpha: &str| {
        let out = tmp.path().join(format!("interpolated-{alpha}"));
        let done = interpolate(alpha, &out);
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        out
    };
    let (zero, one, half) = (at("0"), at("1"), at("0.5"));
    let x = Tensor::rand([4, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu));
    let mask = x.narrow(1, 0, 1).gt(0.7).to_kind(tch::Kind::Float);
    let fine = |p: &Path| {
        let (g, _) = purifier::load(p, tch::Device::Cpu).unwrap();
        let drawn = atop::transforms::Transformed {
            noisy: x.shallow_clone(),
            masks: vec![mask.shallow_clone()],
            hidden: None,
        };
        tch::no_grad(|| g.on_drawn(&drawn))
    };
    let d = (fine(&zero) - fine(trained()))
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-4, "alpha 0 is off the pre-trained purifier by {d}");
    for ((k, t), (_, o)) in generator_weights(&wide)
        .iter()
        .zip(&generator_weights(&one))
    {
        assert!(t.equal(o), "alpha 1 changed {k}");
    }
    assert_eq!(sidecar(&half)["interpolation"]["alpha"], 0.5);
    assert_eq!(sidecar(&half)["purifier"]["width"], 16);
    purifies(&half, 8);
    // The same command again is its result; another alpha, an input's folder or a bad alpha
    // is refused, and the inputs are untouched.
    assert!(interpolate("0.5", &half).status.success());
    let before = generator_weights(trained());
    let start_dir = purifier::resolve(trained()).unwrap();
    for (alpha, out, expect) in [
        ("0.3", &half, "holds another purifier"),
        ("0.5", &start_dir, "--out"),
        ("1.5", &tmp.path().join("never"), "alpha = 1.5"),
    ] {
        let refused = interpolate(alpha, out);
        let msg = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && msg.contains(expect),
            "{alpha}: {msg}"
        );
    }
    assert!(!tmp.path().join("never").exists());
    for ((k, a), (_, b)) in before.iter().zip(&generator_weights(trained())) {
        assert!(a.equal(b), "{k} of the start changed");
    }
    purifies(&wide, 8);

    // Bad input, refused before any step and without a run folder left behind.
    let err = |extra: &[&str], purifier: &Path| {
        let run = tmp.path().join("never");
        let out = atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["train", "atop", "--preset", "atop-demo", "--classifier"])
            .arg(classifier())
            .arg("--purifier")
            .arg(purifier)
            .args(extra)
            .arg("--out")
            .arg(&run)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(!run.exists(), "{extra:?} left {}", run.display());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err(&["--lambda=-1"], trained()).contains("lambda = -1"));
    assert!(err(&["--adversary-eot", "0"], trained()).contains("adversary-eot"));
    assert!(err(&["--widen", "4"], trained()).contains("widen = 4"));
    let ckpt = purifier::resolve(trained()).unwrap();
    let doctored = |name: &str, from: &str, to: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in [purifier::GENERATOR, purifier::DISCRIMINATOR] {
            std::fs::copy(ckpt.join(f), dir.join(f)).unwrap();
        }
        let text = std::fs::read_to_string(ckpt.join(purifier::SIDECAR)).unwrap();
        assert!(text.contains(from), "{from} not in the sidecar");
        std::fs::write(dir.join(purifier::SIDECAR), text.replace(from, to)).unwrap();
        dir
    };
    let fresh = doctored("fresh", "\"epoch\": 3", "\"epoch\": null");
    assert!(err(&[], &fresh).contains("not a pre-trained purifier"));
    let other = doctored(
        "other",
        "\"dataset\": \"cifar10\",",
        "\"dataset\": \"cifar100\",",
    );
    let e = err(&[], &other);
    assert!(
        e.contains("trained for cifar10") && e.contains("cifar100"),
        "{e}"
    );
    let out = atop()
        .args(["train", "atop", "--classifier"])
        .arg(classifier())
        .arg("--resume")
        .arg(&a)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("keeps its classifier"));
}

/// The run-integrity probes of scripts/probe.sh (`integrity-*`: resumes with other inputs or
/// settings, two writers, missing outputs, edited results and shards, duplicate budgets,
/// swapped study stages, ceilings) on this suite's classifier and purifier: every one passes.
#[test]
fn the_run_integrity_probes_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/probe.sh"))
        .current_dir(root)
        .env("ATOP", env!("CARGO_BIN_EXE_atop"))
        .env("ATOP_DATA_DIR", data_dir())
        .env("PROBE_FILTER", "^integrity-")
        .env("PROBE_CLASSIFIER", classifier())
        .env("PROBE_PURIFIER", trained())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = text
        .lines()
        .filter(|l| l.starts_with("PASS integrity-"))
        .count();
    assert!(
        passed >= 14,
        "only {passed} integrity probes passed:\n{text}"
    );
    assert!(!text.lines().any(|l| l.starts_with("SKIP")), "{text}");
}

/// The AE purifier's network (issue 36's first part) agrees with its PyTorch twin
/// (bench/reference/ae.py) on the same weights, images and visible patches: the reconstruction
/// within 1e-5 and every parameter's gradient of one training step's loss within 1e-4.
#[test]
fn ae_network_agrees_with_its_pytorch_twin() {
    for residual in [false, true] {
        ae_twin_agreement(residual);
    }
}

fn ae_twin_agreement(residual: bool) {
    use atop::purifier::ae::{AeConfig, AeNet, random_keep, visible};
    let cfg = AeConfig {
        residual,
        width: 32,
        depth: 2,
        heads: 4,
        decoder_width: 16,
        decoder_depth: 1,
        decoder_heads: 2,
        ..Default::default()
    };
    tch::manual_seed(1);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = AeNet::new(&vs.root(), &cfg, 32).unwrap();
    // Away from the initial values (LayerNorm weights 1, biases 0) so every term counts.
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let noise = v.randn_like() * 0.05;
            let _ = v.g_add_(&noise);
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let (weights, data, theirs) = (
        tmp.path().join("w.safetensors"),
        tmp.path().join("d.safetensors"),
        tmp.path().join("o.safetensors"),
    );
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, &weights).unwrap();
    let x = Tensor::rand([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let target = Tensor::rand([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let keep = random_keep(3, net.patches(), visible(net.patches(), 0.5), Device::Cpu);
    Tensor::write_safetensors(&[("x", &x), ("keep", &keep), ("target", &target)], &data).unwrap();
    let out = net.forward(&x, &keep);
    (&out - &target).square().mean(Kind::Float).backward();
    let status = Command::new(atop::runtime::venv_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/reference/ae.py"))
        .args(["step", "--config", &serde_json::to_string(&cfg).unwrap()])
        .arg("--weights")
        .arg(&weights)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(status.success());
    let theirs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&theirs)
        .unwrap()
        .into_iter()
        .collect();
    let gap = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let d = gap(&out.detach(), &theirs["out"]);
    eprintln!("residual {residual}: reconstruction: max difference {d:.2e}");
    assert!(d < 1e-5, "reconstruction differs by {d}");
    let mut worst = 0.0f64;
    for (name, v) in &named {
        let g = gap(&v.grad(), &theirs[&format!("grad.{name}")]);
        assert!(g < 1e-4, "{name}: gradient differs by {g}");
        worst = worst.max(g);
    }
    eprintln!(
        "{} parameter gradients: max difference {worst:.2e}",
        named.len()
    );
}

/// A small AE purifier run: a one-block ViT on 512 CIFAR-10 images, 2 epochs, guided by the
/// test classifier.
const AE_CONFIG: &str = r#"
epochs = 2
batch_size = 32
train_subset = 512
eval_subset = 64
seed = 4
gan_weight = 0.0
kl_weight = 0.1
schedule = "cosine"
warmup_steps = 4
precision = "f32"
[generator_optimizer]
lr = 0.002
beta1 = 0.9
beta2 = 0.95
[data]
dataset = "cifar10"
[purifier]
kind = "ae"
patch = 4
width = 32
depth = 1
heads = 2
decoder_width = 16
decoder_depth = 1
decoder_heads = 2
residual = true
[transform]
kind = "rt2"
sigma = 0.04
"#;

/// Runs `atop` with `args`, expecting a refusal that leaves `out` unwritten: its stderr.
fn refused(args: &[&str], out: &Path) -> String {
    let done = atop()
        .env("ATOP_DATA_DIR", data_dir())
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(!done.status.success(), "{args:?} was accepted");
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
    String::from_utf8_lossy(&done.stderr).into_owned()
}

/// Issue 36: the AE purifier plugs in wherever the GAN one does, its kind chosen by a setting
/// and recorded in the checkpoint: pre-training (its reconstruction loss falls, no
/// discriminator), `atop purify`, a whole-model attack with exact gradients and EOT, AToP
/// fine-tuning with L_org its reconstruction loss, interpolation; widening and a GAN term are
/// refused by name, and so are AE settings that do not fit.
#[test]
fn an_ae_purifier_plugs_in_wherever_the_gan_one_does() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ae.toml");
    std::fs::write(&config, AE_CONFIG).unwrap();
    let run = tmp.path().join("ae");
    run_ok(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["--quiet", "train", "purifier", "--config"])
            .arg(&config)
            .arg("--classifier")
            .arg(classifier())
            .arg("--out")
            .arg(&run),
    );
    let epochs: Vec<PurifierEpoch> = runlog::read(&run).unwrap();
    assert_eq!(epochs.len(), 2);
    assert!(epochs[1].g_l1 < epochs[0].g_l1, "{epochs:?}");
    assert_eq!((epochs[1].d_loss, epochs[1].g_gan), (0.0, 0.0));
    let dir = purifier::resolve(&run).unwrap();
    assert!(!dir.join(purifier::DISCRIMINATOR).exists());
    let description = purifier::read_sidecar(&dir).unwrap();
    assert_eq!(description.purifier.kind(), "ae");
    let text = std::fs::read_to_string(dir.join(purifier::SIDECAR)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["purifier"]["kind"], "ae");
    assert_eq!(json["purifier"]["width"], 32);

    // Purified under its transform and without one.
    let purified = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args([
                "--json",
                "purify",
                "--n",
                "64",
                "--transform",
                "rt2,none",
                "--purifier",
            ])
            .arg(&run)
            .arg("--classifier")
            .arg(classifier())
            .arg("--out")
            .arg(tmp.path().join("purified")),
    );
    let scores = purified["results"].as_array().unwrap();
    assert_eq!(scores.len(), 2, "{purified}");
    let accuracy = |s: &serde_json::Value, key: &str| s[key].as_f64().unwrap();
    // Every patch visible and no noise: the residual AE stays near its input.
    let none = &scores[1];
    assert_eq!(none["transform"]["kind"], "none");
    assert!(
        accuracy(none, "purified_accuracy") >= accuracy(none, "clean_accuracy") - 0.15,
        "{none}"
    );
    assert!(
        accuracy(&scores[0], "purified_accuracy") > 0.0,
        "{}",
        scores[0]
    );

    // A whole-model attack differentiates through transform, AE and classifier.
    let r = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args([
                "--json", "attack", "--attack", "pgd", "--steps", "3", "--eps", "8/255", "--n",
                "16", "--eot", "2", "--model",
            ])
            .arg(classifier())
            .arg("--purifier")
            .arg(&run)
            .arg("--out")
            .arg(tmp.path().join("attack")),
    );
    let defence = r["defence"].as_str().unwrap();
    assert!(
        defence.contains("rt2") && defence.contains("ae-purifier(patch 4"),
        "{defence}"
    );
    let step = &r["steps"][0];
    assert_eq!(step["grad"]["zero"], 0, "{step}");
    assert!(step["warning"].is_null(), "{step}");

    // AToP: L_org is the AE's reconstruction loss, the whole defended model the adversary.
    let atop_args = |out: &Path, extra: &[&str]| {
        let mut cmd = atop();
        cmd.env("ATOP_DATA_DIR", data_dir())
            .args([
                "--quiet",
                "train",
                "atop",
                "--preset",
                "atop-ae-cifar10-cpu",
                "--epochs",
                "1",
                "--train-subset",
                "64",
                "--eval-subset",
                "8",
                "--eval-steps",
                "1",
                "--eval-eot",
                "1",
                "--precision",
                "f32",
                "--adversary-precision",
                "f32",
                "--classifier",
            ])
            .arg(classifier())
            .arg("--purifier")
            .arg(&run)
            .args(extra)
            .arg("--out")
            .arg(out);
        cmd
    };
    let tuned = tmp.path().join("tuned");
    run_ok(&mut atop_args(&tuned, &[]));
    let tuned_dir = purifier::resolve(&tuned).unwrap();
    let d = purifier::read_sidecar(&tuned_dir).unwrap();
    assert_eq!(d.purifier.kind(), "ae");
    assert!(d.fine_tuning.is_some());
    let moved = generator_weights(&tuned)
        .iter()
        .zip(&generator_weights(&run))
        .filter(|((_, a), (_, b))| !a.equal(b))
        .count();
    assert!(moved > 0, "AToP left every AE weight where it was");
    let half = tmp.path().join("half");
    run_ok(
        atop()
            .args(["--quiet", "purifier", "interpolate", "--tuned"])
            .arg(&tuned)
            .args(["--alpha", "0.5", "--out"])
            .arg(&half),
    );
    assert_eq!(purifier::read_sidecar(&half).unwrap().purifier.kind(), "ae");

    // Refused by name, nothing written.
    let never = tmp.path().join("never");
    for (extra, expected) in [
        (&["--widen", "64"][..], "this purifier is an AE"),
        (
            &["--gan-weight", "1"][..],
            "gan_weight = 1: the AE purifier has no discriminator",
        ),
    ] {
        let out = atop_args(&never, extra).output().unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(!never.exists());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    // Each edit of the config (a replacement) is refused by name.
    for (from, to, expected) in [
        (
            "patch = 4",
            "patch = 4\ndisc_width = 8",
            "unknown field `disc_width`",
        ),
        ("patch = 4", "patch = 8", "transform grid = 8"),
        (
            "patch = 4",
            "patch = 5",
            "not divisible by the ae patch = 5",
        ),
        ("heads = 2\n", "heads = 3\n", "heads = 3 does not divide"),
        ("kind = \"rt2\"", "kind = \"rt3\"", "rt3"),
        ("kind = \"ae\"", "kind = \"vae\"", "unknown variant `vae`"),
        (
            "sigma = 0.04",
            "sigma = 0.04\nmissing_rate = 1.0",
            "missing_rate = 1",
        ),
        ("gan_weight = 0.0", "gan_weight = 0.5", "no discriminator"),
    ] {
        let bad = tmp.path().join("bad.toml");
        // (no guidance: no classifier is needed to reach the check)
        let text = AE_CONFIG.replace("kl_weight = 0.1", "kl_weight = 0.0");
        std::fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        let err = refused(
            &["train", "purifier", "--config", bad.to_str().unwrap()],
            &never,
        );
        assert!(
            err.contains(expected),
            "{to:?}: expected {expected:?}: {err}"
        );
    }
    // A description that names the AE over a GAN's weights, and the reverse.
    for (weights, description) in [(trained(), run.as_path()), (run.as_path(), trained())] {
        let swapped = tmp.path().join("swapped");
        let _ = std::fs::remove_dir_all(&swapped);
        copy_tree(&purifier::resolve(weights).unwrap(), &swapped);
        std::fs::copy(
            purifier::resolve(description)
                .unwrap()
                .join(purifier::SIDECAR),
            swapped.join(purifier::SIDECAR),
        )
        .unwrap();
        let err = match purifier::load(&swapped, Device::Cpu) {
            Ok(_) => panic!("{} loaded", swapped.display()),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("generator.safetensors"), "{err}");
    }
}
