//! `atop run` end to end on real CIFAR-10, at toy sizes: every stage trains, a run killed in
//! its AToP stage resumes, both defended models are evaluated alike, the report compares them;
//! a rerun changes nothing; stages given as checkpoints give the same numbers as the stages
//! that trained them; other settings in the same folder are refused.

mod common;

use std::path::Path;

use common::*;

/// Toy sizes of every stage; `{STAGES}` is replaced by the three stage tables.
const STUDY: &str = r#"
description = "test study"
{STAGES}
[eval]
attacks = ["pgd", "transfer"]
eps = ["8/255"]
steps = 3
eot = 2
n = 24
draws = 3
check_points = 0
seed = 5
batch_size = 12
"#;

const TRAINED: &str = r#"
[classifier]
preset = "cifar10-demo"
[classifier.set]
arch = "wrn-10-1"
epochs = 1
train_subset = 1000
test_subset = 200
[purifier]
preset = "purifier-demo"
[purifier.set]
train_subset = 256
eval_subset = 64
[atop]
preset = "atop-demo"
[atop.set]
epochs = 2
train_subset = 64
eval = { subset = 16, steps = 2, eot = 1 }
"#;

fn study(dir: &Path, name: &str, stages: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, STUDY.replace("{STAGES}", stages)).unwrap();
    path
}

fn run_cmd(config: &Path, out: &Path) -> std::process::Command {
    let mut cmd = atop();
    cmd.env("ATOP_DATA_DIR", data_dir())
        .args(["--threads", "2", "--json", "run", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out);
    cmd
}

/// Every file under `dir` but the two written on each call (`report.md` and `summary.json`
/// carry the time), with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                if rel != "report.md" && rel != "summary.json" && !rel.ends_with(".lock") {
                    out.push((rel, std::fs::read(&p).unwrap()));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn rows(summary: &serde_json::Value) -> Vec<(String, f64, f64)> {
    summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["purifier"].as_str().unwrap().to_string(),
                r["clean"]["single"]["value"].as_f64().unwrap(),
                r["robust"]["single"]["value"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_study_trains_every_stage_resumes_and_reports_both_defended_models() {
    let tmp = tempfile::tempdir().unwrap();
    let config = study(tmp.path(), "study.toml", TRAINED);
    let out = tmp.path().join("study");

    // Killed once the AToP stage has its first of two epochs: the rerun finishes it.
    let killed_after = kill_after_first_checkpoint(&mut run_cmd(&config, &out), &out.join("atop"));
    assert_eq!(killed_after, 1);
    let summary = run_json(&mut run_cmd(&config, &out));
    assert_eq!(last_epoch(&out.join("atop")), Some(2));
    let atop_metrics = std::fs::read_to_string(out.join("atop/metrics.jsonl")).unwrap();
    assert_eq!(atop_metrics.lines().count(), 2, "{atop_metrics}");

    // Every stage trained in the study folder, each from the one before.
    let stages = summary["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    for (s, name) in stages.iter().zip(["classifier", "purifier", "atop"]) {
        assert_eq!(s["stage"], name);
        assert_eq!(s["how"], "trained");
        assert!(s["minutes"].as_f64().unwrap() > 0.0, "{s}");
        assert!(last_epoch(&out.join(name)).is_some(), "{name}");
    }
    let atop_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("atop/config.json")).unwrap()).unwrap();
    assert_eq!(
        Path::new(atop_cfg["classifier"].as_str().unwrap()),
        out.join("classifier")
    );
    assert_eq!(
        Path::new(atop_cfg["purifier"].as_str().unwrap()),
        out.join("purifier")
    );

    // Both defended models, at the same budget, on the same points, under the same attacks.
    let got = rows(&summary);
    assert_eq!(
        got.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["pre-trained", "AToP"]
    );
    for (name, clean, robust) in &got {
        assert!(
            (0.0..=1.0).contains(clean) && (0.0..=1.0).contains(robust),
            "{name}"
        );
        // Robust counts the clean image too: never above the clean accuracy.
        assert!(
            robust <= clean,
            "{name}: robust {robust} above clean {clean}"
        );
    }
    let results = |name: &str| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(out.join("eval").join(name).join("results.json")).unwrap(),
        )
        .unwrap()
    };
    let (pre, tuned) = (results("pretrained-eps8"), results("atop-eps8"));
    assert_eq!(pre["indices"], tuned["indices"]);
    assert_eq!(pre["config"]["settings"], tuned["config"]["settings"]);
    assert_ne!(
        pre["config"]["model"], tuned["config"]["model"],
        "the two evaluations attacked the same weights"
    );
    assert_eq!(pre["n"], 24);
    assert_eq!(pre["config"]["draws"], 3);
    // The paired comparison: on the same points, its mean difference is the difference of the
    // two rows' scores, inside its own interval; the counts of points that moved fit n.
    let comparisons = summary["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 1);
    let c = &comparisons[0];
    assert_eq!(c["eps"], "8/255");
    for (key, (_, clean_pre, robust_pre), (_, clean_tuned, robust_tuned)) in
        [("robust", &got[0], &got[1]), ("clean", &got[0], &got[1])]
    {
        let d = &c[key];
        let mean = d["mean"].as_f64().unwrap();
        let want = if key == "robust" {
            robust_tuned - robust_pre
        } else {
            clean_tuned - clean_pre
        };
        assert!(
            (mean - want).abs() < 1e-9,
            "{key}: paired mean {mean}, rows differ by {want}"
        );
        let (lo, hi) = (d["lo"].as_f64().unwrap(), d["hi"].as_f64().unwrap());
        assert!(lo <= mean && mean <= hi, "{key}: {d}");
        assert_eq!(d["n"], 24);
        assert!(d["better"].as_u64().unwrap() + d["worse"].as_u64().unwrap() <= 24);
    }
    let p = c["robust_majority"]["p"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{c}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "| pre-trained | 8/255 |",
        "| AToP | 8/255 |",
        "R = 3 draws",
        "exact gradients",
        "point by point on the same 24 points and scoring draws",
        "exact McNemar p",
        "strongest attack",
    ] {
        assert!(
            report.contains(needle),
            "report.md lacks {needle:?}:\n{report}"
        );
    }

    // `atop eval compare` on the study's two evaluations gives the report's comparison (the
    // same library call, named by the folders) ...
    let compared = run_json(
        atop()
            .args(["--json", "eval", "compare"])
            .arg(out.join("eval/pretrained-eps8"))
            .arg(out.join("eval/atop-eps8")),
    );
    let compared = &compared.as_array().unwrap()[0];
    for key in ["clean", "robust", "robust_majority", "clean_majority"] {
        assert_eq!(compared[key], c[key], "{key}");
    }
    assert_eq!(compared["second"], "atop-eps8");
    // ... and refuses evaluations whose scoring draws are not the same.
    let reseeded = tmp.path().join("reseeded");
    std::fs::create_dir(&reseeded).unwrap();
    let mut r = results("atop-eps8");
    r["config"]["seed"] = serde_json::json!(6);
    std::fs::write(reseeded.join("results.json"), r.to_string()).unwrap();
    // Recorded complete, so that it is the comparison that refuses it.
    let hash: String = {
        use sha2::{Digest, Sha256};
        Sha256::digest(r.to_string().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    std::fs::write(
        reseeded.join("complete.json"),
        serde_json::json!({ "files": { "results.json": hash } }).to_string(),
    )
    .unwrap();
    let refused = atop()
        .args(["eval", "compare"])
        .arg(out.join("eval/pretrained-eps8"))
        .arg(&reseeded)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("cannot be compared point by point: they differ in seed"),
        "{err}"
    );

    // A rerun of the finished study changes no file.
    let before = files(&out);
    let again = run_json(&mut run_cmd(&config, &out));
    assert_eq!(rows(&again), got);
    let after = files(&out);
    let changed: Vec<&String> = after
        .iter()
        .filter(|f| !before.contains(f))
        .map(|(name, _)| name)
        .collect();
    assert!(
        after.len() == before.len() && changed.is_empty(),
        "a rerun of a finished study changed its files: {changed:?}"
    );

    // Other settings in the same folder: refused, nothing touched.
    let other = study(
        tmp.path(),
        "other.toml",
        &TRAINED.replace("train_subset = 64", "train_subset = 32"),
    );
    let refused = run_cmd(&other, &out).output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("holds a study with other settings (atop differs)"),
        "{err}"
    );
    assert!(files(&out) == before);

    // The same models given as checkpoints: the same evaluation gives the same numbers.
    let given = format!(
        "[classifier]\ncheckpoint = \"{}\"\n[purifier]\ncheckpoint = \"{}\"\n[atop]\ncheckpoint = \"{}\"\n",
        out.join("classifier").display(),
        out.join("purifier").display(),
        out.join("atop").display()
    );
    let given_cfg = study(tmp.path(), "given.toml", &given);
    let out2 = tmp.path().join("given");
    let summary2 = run_json(&mut run_cmd(&given_cfg, &out2));
    for s in summary2["stages"].as_array().unwrap() {
        assert_eq!(s["how"], "given", "{s}");
    }
    assert_eq!(rows(&summary2), got);
    assert!(!out2.join("atop").exists(), "a given stage was trained");

    // Stages given the wrong way round: each checkpoint records whether AToP fine-tuned it.
    let swapped = format!(
        "[classifier]\ncheckpoint = \"{}\"\n[purifier]\ncheckpoint = \"{}\"\n[atop]\ncheckpoint = \"{}\"\n",
        out.join("classifier").display(),
        out.join("atop").display(),
        out.join("purifier").display()
    );
    let swapped_cfg = study(tmp.path(), "swapped.toml", &swapped);
    let o = run_cmd(&swapped_cfg, &tmp.path().join("swapped"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is fine-tuned by AToP"),
        "{err}"
    );

    // The same folder spelled otherwise is the same study: read back, nothing changed.
    let spelled = out
        .parent()
        .unwrap()
        .join(".")
        .join(out.file_name().unwrap());
    let again = run_json(&mut run_cmd(&config, &spelled));
    assert_eq!(rows(&again), got);
    assert!(
        files(&out) == before,
        "another spelling of --out changed the study"
    );

    // Other weights in the classifier stage: refused by name instead of the stages trained on
    // the old ones being kept.
    let ckpt = atop::models::checkpoint::resolve(&out.join("classifier")).unwrap();
    let weights = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let o = run_cmd(&config, &out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // (The classifier stage's own record of its finished checkpoint refuses it first.)
    assert!(
        !o.status.success() && err.contains("changed since the run") && err.contains("classifier"),
        "{err}"
    );
}

#[test]
fn bad_studies_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    for (stages, expect) in [
        (
            TRAINED.replace("train_subset = 64", "train_subset = 64\nlambda = -0.5"),
            "lambda",
        ),
        (
            "[classifier]\ncheckpoint = \"/nonexistent/c\"\n[purifier]\npreset = \"purifier-demo\"\n[atop]\npreset = \"atop-demo\"\n".to_string(),
            "/nonexistent/c",
        ),
    ] {
        let config = study(tmp.path(), "bad.toml", &stages);
        let o = run_cmd(&config, &out).output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(expect), "{err}");
        assert!(!out.exists(), "a refused study left {}", out.display());
    }
    // One budget twice (8/255 = 16/510): refused before any work.
    let config = tmp.path().join("twice.toml");
    std::fs::write(
        &config,
        STUDY
            .replace("{STAGES}", TRAINED)
            .replace(r#"eps = ["8/255"]"#, r#"eps = ["8/255", "16/510"]"#),
    )
    .unwrap();
    let o = run_cmd(&config, &out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("give each budget once"),
        "{err}"
    );
    assert!(!out.exists());
    let o = atop()
        .args(["run", "--preset", "cpu-1min"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("expected one of cpu-15min, cpu-study, cpu-ae, paper-gpu")
    );
}
