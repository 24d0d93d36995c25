//! Classifier training on real CIFAR-10: it learns, a killed run resumes to the same weights,
//! divergence stops with the last good checkpoint kept, nothing is overwritten, and `eval clean`
//! agrees with the trainer's own test accuracy.

mod common;

use std::path::Path;

use atop::models::checkpoint;
use atop::train::classifier::read_metrics;
use common::*;

fn train_cmd(out: &Path) -> std::process::Command {
    let mut cmd = atop();
    cmd.env("ATOP_DATA_DIR", data_dir())
        .args(["--quiet", "--threads", "2"])
        .args(SMALL_CLASSIFIER)
        .arg("--out")
        .arg(out);
    cmd
}

fn weights(run: &Path) -> Vec<(String, tch::Tensor)> {
    sorted_tensors(&checkpoint::resolve(run).unwrap().join(checkpoint::WEIGHTS))
}

#[test]
fn killed_run_resumes_to_the_same_weights_and_the_model_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // The uninterrupted run: a copy of the shared fixture (the test changes it below).
    copy_tree(small_classifier(), &a);

    // Kill B (SIGKILL, no chance to clean up) as soon as its first checkpoint is complete.
    let killed_at = kill_after_first_checkpoint(&mut train_cmd(&b), &b);
    assert!(killed_at < 3, "the run finished before the kill");

    let json = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args(["--json", "train", "classifier", "--resume"])
            .arg(&b),
    );
    assert_eq!(json["resumed_from_epoch"], killed_at);
    assert_eq!(last_epoch(&b), Some(3));
    for ((na, ta), (nb, tb)) in weights(&a).iter().zip(weights(&b).iter()) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resuming");
    }
    let (ma, mb) = (read_metrics(&a).unwrap(), read_metrics(&b).unwrap());
    assert_eq!(
        mb.iter().map(|m| m.epoch).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(ma[2].test_acc, mb[2].test_acc);
    // It learns: 10 classes, chance is 10 %.
    assert!(ma[2].test_acc > 0.3, "test accuracy {}", ma[2].test_acc);
    assert!(ma[2].train_loss < ma[0].train_loss);
    assert!(a.join("curves.png").is_file());

    // `eval clean` on the same 500 test images (same seed) reproduces the trainer's number.
    let json = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args([
                "--json", "eval", "clean", "--subset", "500", "--seed", "1", "--model",
            ])
            .arg(&a),
    );
    assert_eq!(json["accuracy"].as_f64().unwrap(), ma[2].test_acc);
    let confusion: Vec<Vec<usize>> = serde_json::from_value(json["confusion"].clone()).unwrap();
    assert_eq!(confusion.iter().flatten().sum::<usize>(), 500);
    assert!(a.join("confusion-test.png").is_file() && a.join("eval-clean-test.json").is_file());

    // A finished run is never overwritten by a fresh one.
    let out = train_cmd(&a).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a training run"));

    // Divergence stops with the step named and the last good checkpoint kept.
    let out = atop()
        .env("ATOP_DATA_DIR", data_dir())
        .args([
            "--quiet",
            "train",
            "classifier",
            "--epochs",
            "4",
            "--lr",
            "1e30",
            "--resume",
        ])
        .arg(&a)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("diverged") && err.contains("epoch 4 step") && err.contains("epoch-0003"),
        "{err}"
    );
    assert_eq!(last_epoch(&a), Some(3));
    for ((_, ta), (_, tb)) in weights(&a).iter().zip(weights(&b).iter()) {
        assert!(ta.equal(tb), "the kept checkpoint changed");
    }
}

#[test]
fn bad_settings_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let out = atop()
        .args([
            "train",
            "classifier",
            "--dataset",
            "cifar10",
            "--arch",
            "wrn-10-1",
            "--lr=-1",
        ])
        .arg("--out")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid setting lr = -1"));
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "arch = \"wrn-10-1\"\nepochs = 1\nbatch_size = 8\nlr = 0.1\nschedule = \"cosine\"\nlearning_rate = 3\n[data]\ndataset = \"cifar10\"\n").unwrap();
    let out = atop()
        .args(["train", "classifier", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("c.toml") && err.contains("learning_rate"),
        "{err}"
    );
    let out = atop()
        .args(["train", "classifier", "--preset", "nope"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preset 'nope'"));
    let out = atop()
        .args(["train", "classifier", "--resume"])
        .arg(tmp.path().join("none"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
    // A run that cannot find its data names the fix and leaves no folder behind, so the
    // retry with the data in place is not refused as "already holds a training run".
    let run = tmp.path().join("no-data");
    let out = atop()
        .env_remove("ATOP_DATA_DIR")
        .args(["--quiet", "train", "classifier", "--preset", "cifar10-demo"])
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ATOP_DATA_DIR"));
    assert!(!run.exists(), "a failed start left {}", run.display());
}
