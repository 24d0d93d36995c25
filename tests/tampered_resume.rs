//! `attack` and `eval robust` resumed from tampered state: batch files with the wrong shape,
//! positions or names outside the run, holding NaN or out-of-budget images, and state files
//! whose per-point lists do not fit. Each is refused with an error naming the file (never a
//! panic, never replayed into a report). A fixed linear model on random images: no data set
//! needed.

use std::path::Path;

use atop::attacks::{AttackName, AttackSettings, Budget, Norm};
use atop::eval::attack::{Runner, RunnerConfig};
use atop::eval::robust::{AttackSpec, Points, RobustConfig, Surrogates, Target, evaluate};
use atop::models::Model;
use tch::{Device, Kind, Tensor};

/// A fixed linear classifier on 3 x 4 x 4 images (3 classes).
struct Linear(Tensor);
impl Model for Linear {
    fn logits(&self, x: &Tensor) -> Tensor {
        x.flatten(1, -1).matmul(&self.0)
    }
    fn num_classes(&self) -> usize {
        3
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn describe(&self) -> String {
        "linear".into()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("batches")).unwrap();
    for sub in ["", "batches"] {
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
}

/// Rewrites every tensor of batch file `file` through `f(name, tensor)`.
fn edit_batch(dir: &Path, file: &str, f: &dyn Fn(&str, Tensor) -> Tensor) {
    let path = dir.join("batches").join(file);
    let t: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(n, v)| {
            let v = f(&n, v);
            (n, v)
        })
        .collect();
    Tensor::write_safetensors(&t, &path).unwrap();
}

fn edit_images(dir: &Path, file: &str, f: &dyn Fn(Tensor) -> Tensor) {
    edit_batch(dir, file, &|n, t| if n == "images" { f(t) } else { t });
}

fn edit_state(dir: &Path, f: &dyn Fn(&mut serde_json::Value)) {
    let path = dir.join("state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Renames batch file `from` to `to`, in the folder and in state.json.
fn rename_batch(dir: &Path, from: &str, to: &str) {
    let b = dir.join("batches");
    std::fs::rename(b.join(from), b.join(to)).unwrap();
    edit_state(dir, &|s| {
        for name in s["batches"].as_array_mut().unwrap() {
            if name == from {
                *name = to.into();
            }
        }
    });
}

/// One way to tamper with a finished run's folder.
type Tamper<'a> = Box<dyn Fn(&Path) + 'a>;

/// Each case (name, tampering, expected words) applied to a copy of the finished run `base`
/// (copies under `root`): resuming it must be refused as corrupt, with the expected words.
fn assert_each_refused<T>(
    base: &Path,
    root: &Path,
    cases: Vec<(&str, Tamper, &str)>,
    run: impl Fn(&Path) -> anyhow::Result<T>,
) {
    for (name, tamper, expected) in cases {
        let dir = root.join(name);
        copy_dir(base, &dir);
        tamper(&dir);
        let err = format!("{:#}", run(&dir).map(|_| ()).unwrap_err());
        assert!(
            err.contains(expected) && err.contains("the resume state is corrupt"),
            "{name}: {err}"
        );
    }
}

/// The fixed linear model (seeded), six random images labelled as the model classifies them
/// (so every point goes through every attack), their dataset indices, and 2-step settings.
fn setup() -> (Linear, Tensor, Tensor, Vec<usize>, AttackSettings) {
    tch::manual_seed(0);
    let model = Linear(Tensor::randn([48, 3], (Kind::Float, Device::Cpu)));
    let x = Tensor::rand([6, 3, 4, 4], (Kind::Float, Device::Cpu));
    let y = model.logits(&x).argmax(-1, false);
    let mut settings = AttackSettings::new(Budget::new(Norm::Linf, 0.03).unwrap());
    settings.steps = Some(2);
    (model, x, y, (10..16).collect(), settings)
}

#[test]
fn eval_robust_refuses_tampered_resume_files_by_name() {
    let (model, x, y, indices, settings) = setup();
    let spec = |attack| AttackSpec {
        attack,
        target: Target::Whole,
    };
    let config = RobustConfig {
        attacks: vec![spec(AttackName::Fgsm), spec(AttackName::Pgd)],
        settings,
        draws: 2,
        batch_size: 2,
        seed: 0,
        check_points: 0,
        model: "linear".into(),
        data: "random".into(),
        plan: None,
        cascade: false,
    };
    let run = |dir: &Path| {
        evaluate(
            &model,
            Surrogates::default(),
            Points {
                x: &x,
                y: &y,
                indices: &indices,
            },
            &config,
            None,
            Some(dir),
        )
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let (full, _) = run(&base).unwrap();
    // Untampered, the finished evaluation resumes to the same result.
    let (again, _) = run(&base).unwrap();
    assert_eq!(full.records, again.records);

    let b = "00-000002.safetensors";
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "images-wrong-shape",
            Box::new(move |d: &Path| edit_images(d, b, &|t| t.reshape([2, 3, 2, 8]))),
            "batches/00-000002.safetensors: images have shape [2, 3, 2, 8]; expected [2, 3, 4, 4]",
        ),
        (
            "images-nan",
            Box::new(move |d: &Path| edit_images(d, b, &|t| t.fill(f64::NAN))),
            "batches/00-000002.safetensors: images hold NaN",
        ),
        (
            "images-outside-budget",
            Box::new(move |d: &Path| edit_images(d, b, &|t| t.fill(1.0))),
            "batches/00-000002.safetensors: the resume state is corrupt",
        ),
        (
            "first-point-out-of-range",
            Box::new(move |d: &Path| rename_batch(d, b, "00-000999.safetensors")),
            "batches/00-000999.safetensors: the batch starts at point 999",
        ),
        (
            "first-point-inside-a-batch",
            Box::new(move |d: &Path| rename_batch(d, b, "00-000003.safetensors")),
            "batches/00-000003.safetensors: the batch starts at point 3, which does not start a batch of 2",
        ),
        (
            "attack-index-out-of-range",
            Box::new(move |d: &Path| rename_batch(d, b, "99-000002.safetensors")),
            "batches/99-000002.safetensors: the batch is from attack 99, but the evaluation has 2 attacks",
        ),
        (
            "name-leaves-the-folder",
            Box::new(|d: &Path| {
                edit_state(d, &|s| {
                    s["batches"][0] = "../../00-000000.safetensors".into()
                })
            }),
            "00-000000.safetensors: unexpected batch file name",
        ),
        (
            "norms-short",
            Box::new(|d: &Path| edit_state(d, &|s| s["norms"][1] = serde_json::json!([0.0]))),
            "state.json: done[1] / norms[1] hold 6 / 1 entries, expected 6",
        ),
        (
            "grad-missing",
            Box::new(|d: &Path| edit_state(d, &|s| s["grad"] = serde_json::json!([]))),
            "state.json: grad holds 0 entries, expected 2",
        ),
        (
            "draws-short",
            Box::new(|d: &Path| {
                edit_state(d, &|s| s["done"][0][4]["preds"] = serde_json::json!([1]))
            }),
            "state.json: done[0][4] holds 1 predictions, expected R = 2",
        ),
    ];
    assert_each_refused(&base, tmp.path(), cases, run);
}

#[test]
fn attack_runner_refuses_tampered_resume_files_by_name() {
    let (model, x, y, indices, settings) = setup();
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &Path| {
        Runner {
            model: &model,
            config: RunnerConfig {
                attacks: vec![AttackName::Fgsm, AttackName::Pgd],
                settings: settings.clone(),
                batch_size: 2,
                seed: 0,
                model: "linear".into(),
                data: "random".into(),
            },
            state_dir: Some(dir.to_path_buf()),
        }
        .run(&x, &y, &indices)
    };
    let base = tmp.path().join("base");
    let full = run(&base).unwrap();
    // Untampered, the finished run resumes to the same report.
    let again = run(&base).unwrap();
    assert_eq!(full.records, again.records);
    assert!(full.x_adv.equal(&again.x_adv));

    let batch = "00-fgsm-000002.safetensors";
    let pos = |v: i64| move |n: &str, t: Tensor| if n == "positions" { t.fill(v) } else { t };
    let img =
        |f: fn(Tensor) -> Tensor| move |n: &str, t: Tensor| if n == "images" { f(t) } else { t };
    let set =
        |k: &'static str, v: serde_json::Value| move |s: &mut serde_json::Value| s[k] = v.clone();
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "positions-9999",
            Box::new(|d: &Path| edit_batch(d, batch, &pos(9999))),
            "00-fgsm-000002.safetensors: positions hold 9999 but the run has 6 points",
        ),
        (
            "positions-negative",
            Box::new(|d: &Path| edit_batch(d, batch, &pos(-5))),
            "00-fgsm-000002.safetensors: positions hold -5",
        ),
        (
            "positions-repeated",
            Box::new(|d: &Path| edit_batch(d, batch, &pos(2))),
            "00-fgsm-000002.safetensors: positions hold 2 twice",
        ),
        (
            "images-shape",
            Box::new(|d: &Path| {
                edit_batch(
                    d,
                    batch,
                    &img(|t| t.permute([0, 1, 3, 2]).flatten(2, 3).reshape([2, 3, 2, 8])),
                )
            }),
            "00-fgsm-000002.safetensors: images have shape [2, 3, 2, 8]; expected [2, 3, 4, 4]",
        ),
        (
            "images-nan",
            Box::new(|d: &Path| edit_batch(d, batch, &img(|t| t.fill(f64::NAN)))),
            "00-fgsm-000002.safetensors: images hold NaN",
        ),
        (
            "images-outside-ball",
            Box::new(|d: &Path| edit_batch(d, batch, &img(|t| t.fill(1.0)))),
            "00-fgsm-000002.safetensors: images outside the threat model",
        ),
        (
            "clean-empty",
            Box::new(|d: &Path| edit_state(d, &set("clean", serde_json::json!([])))),
            "state.json: clean holds 0 entries, expected 6",
        ),
        (
            "other-point",
            Box::new(|d: &Path| edit_state(d, &|s| s["indices"][3] = 99.into())),
            "state.json: indices hold 6 dataset indices that are not the 6 points of this run",
        ),
        (
            "done-short",
            Box::new(|d: &Path| edit_state(d, &|s| s["done"][1] = serde_json::json!([null]))),
            "state.json: done[1] / norms[1] hold 1 / 6 entries, expected 6",
        ),
        (
            "attacks-extra",
            Box::new(|d: &Path| {
                edit_state(d, &|s| {
                    let extra = s["done"][0].clone();
                    s["done"].as_array_mut().unwrap().push(extra);
                })
            }),
            "state.json: done holds 3 entries, expected 2",
        ),
        (
            "seconds-missing",
            Box::new(|d: &Path| edit_state(d, &set("seconds", serde_json::json!([])))),
            "state.json: seconds holds 0 entries",
        ),
        (
            "draws-long",
            Box::new(|d: &Path| {
                edit_state(d, &|s| s["done"][0][4]["preds"] = serde_json::json!([1, 1]))
            }),
            "state.json: done[0][4] holds 2 predictions, expected R = 1",
        ),
        (
            "batch-path-escape",
            Box::new(|d: &Path| {
                edit_state(d, &|s| s["batches"][0] = "../../../../dev/zero".into())
            }),
            "../../../../dev/zero: not a batch file name of this run",
        ),
    ];
    assert_each_refused(&base, tmp.path(), cases, run);
}
