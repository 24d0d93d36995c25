//! Classifiers: WideResNet (RobustBench parameter names) and ResNet (torchvision names, CIFAR
//! and ImageNet stems). Inputs are always RGB in [0,1]; the mean/std normalisation is part of
//! the model, so attacks and purifiers never need to know about it.

pub mod accuracy;
pub mod airnet;
pub mod checkpoint;
pub mod pickle;
pub mod pipeline;
pub mod pytorch;
pub mod resnet;
pub mod wrn;

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

/// Anything that maps images in [0,1] (N x C x H x W) to logits (N x classes), differentiably
/// with respect to the images; maybe stochastic (fresh randomness on every call). Attacks, EOT
/// and BPDA are written against this trait only: a bare classifier, or transform + purifier +
/// classifier, look the same to them.
pub trait Model {
    fn logits(&self, images: &Tensor) -> Tensor;
    fn num_classes(&self) -> usize;
    fn device(&self) -> Device;
    /// True when two calls on the same input may differ (then attacks should use EOT).
    fn is_stochastic(&self) -> bool {
        false
    }
    /// True when every image of a batch gets its own randomness, so a batch holding K copies
    /// of an image is K independent draws of it (EOT then stacks its draws into one pass).
    /// False, the safe default, when a draw is shared by the batch or depends on its size.
    fn draws_per_sample(&self) -> bool {
        false
    }
    /// The side the model works at inside when it is larger than its input (a purifier at
    /// 256 px behind 32 px images); `None`: the input's own size. EOT stacks fewer draws per
    /// pass for it, since each image then holds (work / side)^2 times the activations.
    fn work_size(&self) -> Option<usize> {
        None
    }
    /// A short description for reports.
    fn describe(&self) -> String;
}

/// A model whose randomness was measured: `is_stochastic` reports the measurement (two calls
/// on the same images differ) instead of the model's declaration, and everything else is the
/// inner model's. Evaluations hand attacks this, so the rule an attack follows on a random
/// model ([`crate::attacks::select`]) rests on what was measured.
pub struct Measured<'a> {
    pub inner: &'a dyn Model,
    pub stochastic: bool,
}

impl Model for Measured<'_> {
    fn logits(&self, images: &Tensor) -> Tensor {
        self.inner.logits(images)
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn is_stochastic(&self) -> bool {
        self.stochastic
    }
    fn draws_per_sample(&self) -> bool {
        self.inner.draws_per_sample()
    }
    fn work_size(&self) -> Option<usize> {
        self.inner.work_size()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl Model for Classifier {
    fn logits(&self, images: &Tensor) -> Tensor {
        self.forward_t(images, false)
    }
    fn num_classes(&self) -> usize {
        self.spec.num_classes
    }
    fn device(&self) -> Device {
        self.vs.device()
    }
    fn draws_per_sample(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        self.spec.arch.to_string()
    }
}

/// Which ResNet stem: CIFAR (3x3 stride 1, no max-pool) or ImageNet (7x7 stride 2 + max-pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    Cifar,
    Imagenet,
}

/// An architecture name as written on the command line: `wrn-28-10`, `resnet18`,
/// `resnet34-imagenet`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    WideResNet {
        depth: usize,
        widen: usize,
    },
    ResNet {
        depth: usize,
        stem: Stem,
    },
    /// The fast CPU network (see [`airnet`]): three groups of the given widths.
    AirNet {
        widths: [usize; 3],
    },
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let unknown = || {
            format!(
                "unknown architecture '{s}': expected wrn-DEPTH-WIDTH (DEPTH = 6n+4, e.g. wrn-28-10, wrn-16-4) resnet18|34|50 with an optional -imagenet stem, or airnet-W1-W2-W3 (e.g. airnet-64-256-256)"
            )
        };
        if let Some(rest) = lower.strip_prefix("wrn-") {
            let (d, w) = rest.split_once('-').ok_or_else(unknown)?;
            let depth: usize = d.parse().map_err(|_| unknown())?;
            let widen: usize = w.parse().map_err(|_| unknown())?;
            if depth < 10
                || !(depth - 4).is_multiple_of(6)
                || depth > MAX_WRN_DEPTH
                || widen == 0
                || widen > MAX_WRN_WIDEN
            {
                return Err(format!(
                    "'{s}': WideResNet depth must be 6n+4 (10, 16, 22, 28, 34, 40, 70, ... up to {MAX_WRN_DEPTH}) and width 1 to {MAX_WRN_WIDEN}"
                ));
            }
            return Ok(Arch::WideResNet { depth, widen });
        }
        if let Some(rest) = lower.strip_prefix("resnet") {
            let (d, stem) = match rest.strip_suffix("-imagenet") {
                Some(d) => (d, Stem::Imagenet),
                None => (rest, Stem::Cifar),
            };
            let depth: usize = d.parse().map_err(|_| unknown())?;
            if ![18, 34, 50].contains(&depth) {
                return Err(format!("'{s}': ResNet depth must be 18, 34 or 50"));
            }
            return Ok(Arch::ResNet { depth, stem });
        }
        if let Some(rest) = lower.strip_prefix("airnet-") {
            let widths: Vec<usize> = rest
                .split('-')
                .map(|w| w.parse().map_err(|_| unknown()))
                .collect::<Result<_, _>>()?;
            if widths.len() != 3 || widths.iter().any(|w| !(1..=MAX_AIRNET_WIDTH).contains(w)) {
                return Err(format!(
                    "'{s}': airnet needs three widths from 1 to {MAX_AIRNET_WIDTH}, e.g. airnet-64-256-256"
                ));
            }
            return Ok(Arch::AirNet {
                widths: [widths[0], widths[1], widths[2]],
            });
        }
        Err(unknown())
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::WideResNet { depth, widen } => write!(f, "wrn-{depth}-{widen}"),
            Arch::ResNet {
                depth,
                stem: Stem::Cifar,
            } => write!(f, "resnet{depth}"),
            Arch::ResNet {
                depth,
                stem: Stem::Imagenet,
            } => write!(f, "resnet{depth}-imagenet"),
            Arch::AirNet { widths: [a, b, c] } => write!(f, "airnet-{a}-{b}-{c}"),
        }
    }
}

impl Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Everything needed to rebuild a classifier (stored in the checkpoint's JSON sidecar).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: Arch,
    pub num_classes: usize,
    /// Per-channel mean and std applied inside the model: `(x - mean) / std`.
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

/// Normalisation constants of the datasets atop knows.
pub fn dataset_normalisation(dataset: crate::data::DatasetKind) -> ([f64; 3], [f64; 3]) {
    use crate::data::DatasetKind::*;
    match dataset {
        Cifar10 => ([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]),
        Cifar100 => ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
        Imagenette | Folder => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    }
}

/// Limits that keep a typo or a crafted file from asking for terabytes before any work: more
/// classes than any public dataset, wider than any published network.
pub const MAX_CLASSES: usize = 100_000;
pub const MAX_WRN_WIDEN: usize = 64;
pub const MAX_WRN_DEPTH: usize = 1000;
pub const MAX_AIRNET_WIDTH: usize = 8192;

impl ModelSpec {
    pub fn new(arch: Arch, num_classes: usize, mean: [f64; 3], std: [f64; 3]) -> Result<Self> {
        let spec = ModelSpec {
            arch,
            num_classes,
            mean,
            std,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what a model description read from disk may hold.
    pub fn validate(&self) -> Result<()> {
        let (num_classes, mean, std) = (self.num_classes, self.mean, self.std);
        if !(2..=MAX_CLASSES).contains(&num_classes) {
            bail!("num_classes = {num_classes}: expected 2 to {MAX_CLASSES} classes");
        }
        if std.iter().any(|s| !(*s > 0.0 && s.is_finite())) || mean.iter().any(|m| !m.is_finite()) {
            bail!("normalisation mean {mean:?} / std {std:?}: std must be positive and all finite");
        }
        // The architecture's own limits are checked when its name is parsed.
        self.arch
            .to_string()
            .parse::<Arch>()
            .map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

/// A classifier: parameters in a VarStore, the network, and its input normalisation.
pub struct Classifier {
    pub spec: ModelSpec,
    pub vs: nn::VarStore,
    net: Box<dyn ModuleT + Send>,
    mean: Tensor,
    std: Tensor,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Classifier {
    /// A freshly initialised classifier on `device`.
    pub fn new(spec: ModelSpec, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let net: Box<dyn ModuleT + Send> = match spec.arch {
            Arch::WideResNet { depth, widen } => {
                Box::new(wrn::WideResNet::new(&root, depth, widen, spec.num_classes))
            }
            Arch::ResNet { depth, stem } => {
                Box::new(resnet::ResNet::new(&root, depth, stem, spec.num_classes))
            }
            Arch::AirNet { widths } => {
                Box::new(airnet::AirNet::new(&root, widths, spec.num_classes))
            }
        };
        if device == Device::Cpu {
            channels_last_weights(&vs);
        }
        let mean = Tensor::from_slice(&spec.mean)
            .to_kind(tch::Kind::Float)
            .view([1, 3, 1, 1])
            .to_device(device);
        let std = Tensor::from_slice(&spec.std)
            .to_kind(tch::Kind::Float)
            .view([1, 3, 1, 1])
            .to_device(device);
        Classifier {
            spec,
            vs,
            net,
            mean,
            std,
        }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Logits for images in [0,1] (N x 3 x H x W); `train` switches batch-norm statistics.
    pub fn forward_t(&self, images: &Tensor, train: bool) -> Tensor {
        let x = (images - &self.mean) / &self.std;
        // NHWC layout (same logical shape): oneDNN's convolutions are faster on it on the CPU,
        // and the layout propagates through the network.
        let x = if x.device() == Device::Cpu {
            x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
        } else {
            x
        };
        self.net.forward_t(&x, train)
    }

    pub fn needs_data_init(&self) -> bool {
        matches!(self.spec.arch, Arch::AirNet { .. })
    }

    /// Data-dependent initialisation some architectures need before training (airnet's
    /// whitening layer); `images` are training images in [0,1]. A no-op for the others.
    pub fn init_from_data(&mut self, images: &Tensor) {
        if self.needs_data_init() {
            let x = (images.to_device(self.device()) - &self.mean) / &self.std;
            let filters = airnet::whitening_filters(&x);
            let mut vars = self.vs.variables();
            let w = vars
                .get_mut("whiten.weight")
                .expect("airnet has a whitening layer");
            tch::no_grad(|| w.copy_(&filters));
        }
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }
}

/// Stores 4-D weights in channels-last (NHWC) memory order, keeping their logical shape. With
/// channels-last inputs oneDNN then runs without reordering the weights on every pass (measured
/// with PyTorch on WRN-28-10, input gradient, batch 8: 0.89 s with NCHW weights, 0.77 s with
/// NHWC). Values and names are unchanged; checkpoints are written contiguous (NCHW).
fn channels_last_weights(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let nhwc = v.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
                v.set_data(&nhwc);
            }
        }
    });
}

/// `nn::ConvConfig` for a bias-free conv with He (fan-out) init, as torchvision and RobustBench do.
pub(crate) fn conv_cfg(stride: i64, padding: i64) -> nn::ConvConfig {
    nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_round_trip_and_bad_names_explain() {
        for name in [
            "wrn-28-10",
            "wrn-16-4",
            "wrn-70-16",
            "resnet18",
            "resnet34-imagenet",
            "resnet50",
            "airnet-64-256-256",
        ] {
            assert_eq!(name.parse::<Arch>().unwrap().to_string(), name);
        }
        assert!("wrn-27-10".parse::<Arch>().unwrap_err().contains("6n+4"));
        assert!(
            "resnet19"
                .parse::<Arch>()
                .unwrap_err()
                .contains("18, 34 or 50")
        );
        assert!(
            "vgg16"
                .parse::<Arch>()
                .unwrap_err()
                .contains("unknown architecture 'vgg16'")
        );
    }
}
