//! `atop import` on checkpoints written by PyTorch itself (bench/reference/models.py --pt):
//! same logits as PyTorch, `{"state_dict"}` and `module.` wrappers accepted, a malicious pickle
//! refused without running it, mismatches named.

mod common;

use std::path::PathBuf;
use std::process::Command;

use atop::models::checkpoint;
use common::*;

fn reference(out: &std::path::Path, archs: &[&str]) {
    let python = atop::runtime::venv_python();
    assert!(
        python.is_file(),
        "{} not found: run scripts/setup.sh",
        python.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/reference/models.py");
    let o = Command::new(python)
        .arg(script)
        .arg("--out")
        .arg(out)
        .arg("--pt")
        .arg("--arch")
        .args(archs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn imported_models_give_pytorchs_logits_and_evil_pickles_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    reference(tmp.path(), &["wrn-16-4", "resnet18"]);
    for (arch, file) in [("wrn-16-4", "model.pt"), ("resnet18", "wrapped.pt")] {
        let dir = tmp.path().join(arch);
        let out = tmp.path().join(format!("imported-{arch}"));
        let json = run_json(
            atop()
                .args([
                    "--json",
                    "import",
                    "--arch",
                    arch,
                    "--num-classes",
                    "10",
                    "--dataset",
                    "cifar10",
                    "--input",
                ])
                .arg(dir.join(file))
                .arg("--out")
                .arg(&out),
        );
        assert_eq!(json["arch"], arch);
        let (model, sidecar) = checkpoint::load(&out, tch::Device::Cpu).unwrap();
        assert_eq!(sidecar.dataset.as_deref(), Some("cifar10"));
        let io: std::collections::HashMap<String, tch::Tensor> =
            checkpoint::read_tensors(&dir.join("io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let ours = tch::no_grad(|| model.forward_t(&io["x"], false));
        let diff = (&ours - &io["logits"]).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{arch} from {file}: max diff {diff}");
    }

    // The malicious file: refused, and its payload never ran.
    let out = atop()
        .args([
            "import",
            "--arch",
            "wrn-16-4",
            "--num-classes",
            "10",
            "--dataset",
            "cifar10",
            "--input",
        ])
        .arg(tmp.path().join("evil.pt"))
        .arg("--out")
        .arg(tmp.path().join("evil-out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("evil.pt") && err.contains("system") && err.contains("does not run code"),
        "{err}"
    );
    assert!(
        !tmp.path().join("pwned").exists(),
        "the pickle's payload ran"
    );
    assert!(!tmp.path().join("evil-out").exists());

    // Wrong class count, wrong architecture, not a checkpoint, truncated file.
    let run = |arch: &str, classes: &str, input: PathBuf| {
        let o = atop()
            .args([
                "import",
                "--arch",
                arch,
                "--num-classes",
                classes,
                "--dataset",
                "cifar10",
                "--input",
            ])
            .arg(&input)
            .arg("--out")
            .arg(tmp.path().join("x"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let model_pt = tmp.path().join("wrn-16-4/model.pt");
    let err = run("wrn-16-4", "100", model_pt.clone());
    assert!(
        err.contains("model.pt: tensor fc.bias has shape [10], wrn-16-4 expects [100]"),
        "{err}"
    );
    let err = run("wrn-28-10", "10", model_pt.clone());
    assert!(err.contains("shape") || err.contains("missing"), "{err}");
    let err = run("wrn-16-4", "10", tmp.path().join("wrn-16-4/io.safetensors"));
    assert!(err.contains("not a PyTorch zip checkpoint"), "{err}");
    let bytes = std::fs::read(&model_pt).unwrap();
    let cut = tmp.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = run("wrn-16-4", "10", cut);
    assert!(err.contains("cut.pt"), "{err}");
}
