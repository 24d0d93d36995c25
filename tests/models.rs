//! Architectures (parameter counts, RobustBench/torchvision names and shapes) and strict,
//! atomic checkpoints.

mod common;

use atop::data::DatasetKind;
use atop::models::checkpoint::{self, CheckpointError, Sidecar};
use atop::models::{Arch, Classifier, ModelSpec, dataset_normalisation};
use tch::{Device, Kind, Tensor};

fn spec(arch: &str, classes: usize) -> ModelSpec {
    let (mean, std) = dataset_normalisation(DatasetKind::Cifar10);
    ModelSpec::new(arch.parse().unwrap(), classes, mean, std).unwrap()
}

fn model(arch: &str, classes: usize) -> Classifier {
    tch::manual_seed(0);
    Classifier::new(spec(arch, classes), Device::Cpu)
}

#[test]
fn parameter_counts_match_the_reference_implementations() {
    // RobustBench WRN-28-10 (36.5 M) and torchvision ResNets with 1000 classes.
    assert_eq!(model("wrn-28-10", 10).num_parameters(), 36_479_194);
    assert_eq!(model("wrn-16-4", 10).num_parameters(), 2_748_890);
    assert_eq!(model("resnet18", 10).num_parameters(), 11_173_962);
    assert_eq!(
        model("resnet18-imagenet", 1000).num_parameters(),
        11_689_512
    );
    assert_eq!(
        model("resnet34-imagenet", 1000).num_parameters(),
        21_797_672
    );
    assert_eq!(
        model("resnet50-imagenet", 1000).num_parameters(),
        25_557_032
    );
}

#[test]
fn wrn_state_dict_has_robustbench_names_and_shapes() {
    let m = model("wrn-28-10", 10);
    let vars = m.vs.variables();
    // 12 blocks x 10 tensors + 3 projections + conv1 + bn1 (4) + fc (2); no num_batches_tracked.
    assert_eq!(vars.len(), 130);
    let shape = |n: &str| {
        vars.get(n)
            .unwrap_or_else(|| panic!("no tensor {n}"))
            .size()
    };
    assert_eq!(shape("conv1.weight"), vec![16, 3, 3, 3]);
    assert_eq!(
        shape("block1.layer.0.convShortcut.weight"),
        vec![160, 16, 1, 1]
    );
    assert_eq!(shape("block2.layer.0.conv1.weight"), vec![320, 160, 3, 3]);
    assert_eq!(shape("block3.layer.3.bn2.running_var"), vec![640]);
    assert_eq!(shape("bn1.weight"), vec![640]);
    assert_eq!(shape("fc.weight"), vec![10, 640]);
    assert!(!vars.contains_key("block1.layer.1.convShortcut.weight"));
    let r = model("resnet50-imagenet", 10);
    let vars = r.vs.variables();
    assert_eq!(
        vars["layer2.0.downsample.0.weight"].size(),
        vec![512, 256, 1, 1]
    );
    assert_eq!(vars["layer4.2.conv3.weight"].size(), vec![2048, 512, 1, 1]);
    assert_eq!(vars["conv1.weight"].size(), vec![64, 3, 7, 7]);
}

#[test]
fn forward_shapes_for_cifar_and_imagenet_inputs() {
    let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    assert_eq!(
        model("wrn-16-4", 10).forward_t(&x, false).size(),
        vec![2, 10]
    );
    assert_eq!(
        model("resnet18", 100).forward_t(&x, true).size(),
        vec![2, 100]
    );
    let x = Tensor::rand([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    assert_eq!(
        model("resnet34-imagenet", 10).forward_t(&x, false).size(),
        vec![1, 10]
    );
}

fn sidecar_for(m: &Classifier) -> Sidecar {
    Sidecar::new(
        m.spec.clone(),
        Some("cifar10".into()),
        (0..10).map(|i| format!("c{i}")).collect(),
        Some(3),
        serde_json::json!({"lr": 0.1}),
    )
}

#[test]
fn checkpoint_round_trip_gives_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("wrn-16-4", 10);
    // Train-mode passes move the BN running statistics away from their init, so they must be saved too.
    let x = Tensor::rand([8, 3, 32, 32], (Kind::Float, Device::Cpu));
    let _ = tch::no_grad(|| m.forward_t(&x, true));
    checkpoint::save(&m, &sidecar_for(&m), tmp.path()).unwrap();
    assert!(!tmp.path().join("model.safetensors.tmp").exists());
    let (back, side) = checkpoint::load(tmp.path(), Device::Cpu).unwrap();
    assert_eq!(side.spec, m.spec);
    assert_eq!(side.epoch, Some(3));
    assert_eq!(side.torch_version, "2.11.0");
    let a = tch::no_grad(|| m.forward_t(&x, false));
    let b = tch::no_grad(|| back.forward_t(&x, false));
    assert!(a.equal(&b));
    // Loading by file path works too.
    checkpoint::load(&tmp.path().join("model.safetensors"), Device::Cpu).unwrap();
}

fn write_weights(path: &std::path::Path, tensors: &[(String, Tensor)]) {
    Tensor::write_safetensors(tensors, path).unwrap();
}

fn all_weights(m: &Classifier) -> Vec<(String, Tensor)> {
    // Contiguous copies: on the CPU conv weights are stored channels-last.
    let mut v: Vec<(String, Tensor)> =
        m.vs.variables()
            .into_iter()
            .map(|(k, t)| (k, t.contiguous()))
            .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn missing_extra_misshaped_nan_and_truncated_weights_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("w.safetensors");
    let src = model("wrn-16-4", 10);
    let mut dst = model("wrn-16-4", 10);

    let mut w = all_weights(&src);
    w.retain(|(n, _)| n != "block2.layer.1.conv2.weight");
    write_weights(&file, &w);
    let e = checkpoint::load_weights(&mut dst, &file).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Missing { names, .. } if names == &["block2.layer.1.conv2.weight"]),
        "{e}"
    );
    assert!(e.to_string().contains("w.safetensors"));

    let mut w = all_weights(&src);
    w.push((
        "head.extra".into(),
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
    ));
    // PyTorch's BN counters are accepted and ignored.
    w.push(("bn1.num_batches_tracked".into(), Tensor::from(5i64)));
    write_weights(&file, &w);
    let e = checkpoint::load_weights(&mut dst, &file).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Unexpected { names, .. } if names == &["head.extra"]),
        "{e}"
    );

    let other = model("wrn-16-4", 100);
    write_weights(&file, &all_weights(&other));
    let e = checkpoint::load_weights(&mut dst, &file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fc.bias") && e.contains("[100]") && e.contains("[10]"),
        "{e}"
    );

    let mut w = all_weights(&src);
    for (n, t) in w.iter_mut() {
        if n == "fc.weight" {
            *t = t.copy().fill_(f64::NAN);
        }
    }
    write_weights(&file, &w);
    let e = checkpoint::load_weights(&mut dst, &file)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc.weight") && e.contains("NaN"), "{e}");

    write_weights(&file, &all_weights(&src));
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    let e = checkpoint::load_weights(&mut dst, &file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("w.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    // A failed load leaves the model's weights untouched by the bad file's contents.
    let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    assert!(bool::try_from(tch::no_grad(|| dst.forward_t(&x, false)).isfinite().all()).unwrap());
}

#[test]
fn sidecar_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("resnet18", 10);
    checkpoint::save(&m, &sidecar_for(&m), tmp.path()).unwrap();
    let json_path = tmp.path().join("model.json");
    let text = std::fs::read_to_string(&json_path).unwrap();
    std::fs::write(&json_path, text.replace("\"resnet18\"", "\"resnet19\"")).unwrap();
    let e = checkpoint::load(tmp.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.json") && e.contains("resnet19"), "{e}");
    std::fs::remove_file(&json_path).unwrap();
    let e = checkpoint::load(tmp.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.json") && e.contains("cannot read"), "{e}");
    let e = checkpoint::load(&tmp.path().join("modle"), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("modle: no such file or folder"), "{e}");
    assert!(
        ModelSpec::new(
            Arch::WideResNet {
                depth: 16,
                widen: 4
            },
            1,
            [0.0; 3],
            [1.0; 3]
        )
        .is_err()
    );
    assert!(
        ModelSpec::new(
            Arch::WideResNet {
                depth: 16,
                widen: 4
            },
            10,
            [0.0; 3],
            [1.0, 0.0, 1.0]
        )
        .is_err()
    );
}
