//! atop's classifiers agree with PyTorch (RobustBench's WideResNet layout, torchvision's ResNets)
//! on the same weights and inputs: bench/reference/models.py builds them in the set-up's venv.

mod common;

use std::path::PathBuf;
use std::process::Command;

use atop::data::DatasetKind;
use atop::models::checkpoint;
use atop::models::{Classifier, ModelSpec, dataset_normalisation};
use tch::Device;

fn venv_python() -> PathBuf {
    let path = atop::runtime::venv_python();
    assert!(
        path.is_file(),
        "{} not found: run scripts/setup.sh",
        path.display()
    );
    path
}

#[test]
fn logits_match_pytorch_to_1e4_on_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/reference/models.py");
    let archs = [
        "wrn-16-4",
        "wrn-28-10",
        "resnet18",
        "resnet34-imagenet",
        "resnet50-imagenet",
        "airnet-64-256-256",
    ];
    common::run_ok(
        Command::new(venv_python())
            .arg(&script)
            .arg("--out")
            .arg(tmp.path())
            .arg("--arch")
            .args(archs),
    );
    let (mean, std) = dataset_normalisation(DatasetKind::Cifar10);
    for arch in archs {
        let dir = tmp.path().join(arch);
        let spec = ModelSpec::new(arch.parse().unwrap(), 10, mean, std).unwrap();
        let mut model = Classifier::new(spec, Device::Cpu);
        // The PyTorch state dict loads as is (its num_batches_tracked entries are ignored).
        checkpoint::load_weights(&mut model, &dir.join("weights.safetensors")).unwrap();
        let io: std::collections::HashMap<String, tch::Tensor> =
            checkpoint::read_tensors(&dir.join("io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let ours = tch::no_grad(|| model.forward_t(&io["x"], false));
        let diff = (&ours - &io["logits"]).abs().max().double_value(&[]);
        let scale = io["logits"].abs().max().double_value(&[]);
        eprintln!("{arch}: max diff {diff:.2e}, max logit {scale:.3}");
        assert!(
            diff < 1e-4 * scale.max(1.0),
            "{arch}: max |atop - pytorch| = {diff} (logits up to {scale})"
        );
    }
}
