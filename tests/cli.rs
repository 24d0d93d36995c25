//! The `atop` binary as users run it: no LD_LIBRARY_PATH, global flags, clear errors.

mod common;

use common::*;

#[test]
fn binary_runs_in_a_clean_environment_and_reports_torch() {
    // env_clear: no LD_LIBRARY_PATH, no venv, no cargo variables; the rpath must do it.
    let json = run_json(atop().env_clear().args(["info", "--json"]));
    assert_eq!(json["torch_version"], "2.11.0");
    assert!(json["threads"].as_u64().unwrap() >= 1);
}

#[test]
fn allocator_is_tuned_unless_the_user_sets_malloc_options() {
    let json = run_json(atop().env_remove("GLIBC_TUNABLES").args(["info", "--json"]));
    assert_eq!(json["allocator_tuned"], true);
    // glibc's own default value: the user's setting wins, atop leaves the allocator alone.
    let json = run_json(
        atop()
            .env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
            .args(["info", "--json"]),
    );
    assert_eq!(json["allocator_tuned"], false);
}

#[test]
fn bench_rounds_are_bounded() {
    for rounds in ["0", "101"] {
        let out = atop()
            .args(["bench", "attacks", "--no-reference", "--rounds", rounds])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--rounds"), "{err}");
    }
}

#[test]
fn adversary_fraction_is_a_share_of_the_batch() {
    for share in ["0", "1.5", "half"] {
        let out = atop()
            .args(["train", "atop", "--preset", "atop-demo", "--out"])
            .arg(std::env::temp_dir().join("atop-never-written"))
            .args(["--adversary-fraction", share])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--adversary-fraction") && err.contains("(0, 1]"),
            "{err}"
        );
    }
}

#[test]
fn threads_flag_is_applied() {
    let out = atop()
        .args(["--threads", "1", "--json", "info"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["threads"], 1);
}

#[test]
fn bad_device_and_unavailable_cuda_are_clear_errors() {
    let out = atop().args(["--device", "tpu", "info"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown device 'tpu'"), "{err}");
    if !tch::Cuda::is_available() {
        let out = atop()
            .args(["--device", "cuda:0", "info"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("no CUDA device"));
    }
}

#[test]
fn inspect_missing_root_fails_naming_it() {
    let out = atop()
        .args([
            "data",
            "inspect",
            "--dataset",
            "folder",
            "--root",
            "/nonexistent/imgs",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/imgs") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn inspect_real_cifar10_subset_records_indices_and_writes_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = tmp.path().join("g.png");
    let json = run_json(
        atop()
            .env("ATOP_DATA_DIR", data_dir())
            .args([
                "--json",
                "data",
                "inspect",
                "--dataset",
                "cifar10",
                "--split",
                "test",
                "--subset",
                "100",
                "--seed",
                "3",
                "--grid",
            ])
            .arg(&grid),
    );
    assert_eq!(json["images"], 100);
    let idx: Vec<usize> = serde_json::from_value(json["subset_indices"].clone()).unwrap();
    assert_eq!(
        idx,
        atop::data::subset::seeded_subset(10_000, 100, 3).unwrap()
    );
    let counts: usize = json["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["count"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(counts, 100);
    let img = image::open(&grid).unwrap();
    assert!(img.width() > 300 && img.height() > 300);
}

#[test]
fn bench_models_reports_both_sides_and_their_ratio() {
    let rows = run_json(atop().args([
        "--json",
        "--threads",
        "1",
        "bench",
        "models",
        "--arch",
        "wrn-10-1",
        "--batch",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]));
    let row = &rows[0];
    assert_eq!(row["atop"]["arch"], "wrn-10-1");
    assert_eq!(row["pytorch"]["threads"], 1);
    for side in ["atop", "pytorch"] {
        for key in ["infer_img_s", "train_img_s"] {
            assert!(row[side][key].as_f64().unwrap() > 0.0, "{side}.{key}");
        }
    }
    let ratio = row["train_ratio"].as_f64().unwrap();
    let expect = row["atop"]["train_img_s"].as_f64().unwrap()
        / row["pytorch"]["train_img_s"].as_f64().unwrap();
    assert!((ratio - expect).abs() < 1e-9);
    let out = atop()
        .args(["bench", "models", "--arch", "vgg11"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown architecture 'vgg11'"));
}

/// The first row of `atop --json --threads 1 bench KIND ARGS` over one quick round (batch 2,
/// one timed step, no warm-up).
fn quick_bench(kind: &str, args: &[&str]) -> serde_json::Value {
    let mut c = atop();
    c.args(["--json", "--threads", "1", "bench", kind])
        .args(args)
        .args([
            "--batch", "2", "--steps", "1", "--warmup", "0", "--rounds", "1",
        ]);
    run_json(&mut c)[0].clone()
}

/// Both sides timed (`ours` and `theirs`, keys of `row`), and the ratio that one round's.
fn assert_both_sides(row: &serde_json::Value, ours: &str, theirs: &str) {
    let (a, t) = (row[ours].as_f64().unwrap(), row[theirs].as_f64().unwrap());
    assert!(a > 0.0 && t > 0.0, "{row}");
    assert!(
        (row["ratio"].as_f64().unwrap() - a / t).abs() < 1e-9,
        "{row}"
    );
}

#[test]
fn bench_atop_times_the_step_on_both_sides() {
    let row = quick_bench(
        "atop",
        &["--adversary", "fgsm", "--adversary-target", "classifier"],
    );
    assert_eq!(row["preset"], "atop-cifar10-cpu");
    assert_eq!(row["batch"], 2);
    assert!(
        row["adversary"]
            .as_str()
            .unwrap()
            .contains("against the classifier alone"),
        "{row}"
    );
    // One round: the ratio is that round's.
    assert_both_sides(&row, "atop_steps_s", "pytorch_steps_s");
    let out = atop()
        .args(["bench", "atop", "--batch", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch"));
}

#[test]
fn bench_purifier_times_an_ae_preset_beside_its_twin_and_refuses_mixed_kinds() {
    let row = quick_bench("purifier", &["--preset", "purifier-ae-cifar10-cpu"]);
    assert_eq!(row["name"], "purifier-ae-cifar10-cpu");
    // The preset's network, not the default one: its width and its parameter count.
    assert!(
        row["purifier"]
            .as_str()
            .unwrap()
            .contains("192 x 4 heads 6"),
        "{row}"
    );
    assert_eq!(row["parameters"], 2_237_552);
    assert_both_sides(&row, "atop_img_s", "pytorch_img_s");
    let out = atop()
        .args([
            "bench",
            "purifier",
            "--preset",
            "purifier-cifar10-cpu",
            "purifier-ae-cifar10-cpu",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("two kinds") && err.contains("purifier-ae-cifar10-cpu"),
        "{err}"
    );
}

#[test]
fn bench_atop_times_the_ae_purifiers_step_on_both_sides() {
    let row = quick_bench(
        "atop",
        &[
            "--preset",
            "atop-ae-cifar10-cpu",
            "--purifier-preset",
            "purifier-ae-cifar10-cpu",
        ],
    );
    assert_eq!(row["preset"], "atop-ae-cifar10-cpu");
    assert!(
        row["purifier"]
            .as_str()
            .unwrap()
            .starts_with("ae-purifier(patch 4, 192 x 4"),
        "{row}"
    );
    assert_both_sides(&row, "atop_steps_s", "pytorch_steps_s");
}
