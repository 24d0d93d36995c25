//! What an evaluation attacks: a classifier, optionally behind a defence (quantisation, a random
//! transform, a purifier), on a seeded subset of a split of the data it was trained on. Shared
//! by `atop attack`, `atop eval robust` and `atop run`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tch::Tensor;

use crate::data::subset::seeded_subset;
use crate::data::{DataConfig, DatasetKind, ImageSet, Split};
use crate::models::checkpoint::{self, Sidecar};
use crate::models::pipeline::Pipeline;
use crate::models::{Classifier, Model};
use crate::purifier::defended::{Defence, defended};
use crate::purifier::{Purifier, PurifierSidecar};
use crate::transforms::{TransformConfig, TransformKind, TransformOverrides};

/// Which data a model is evaluated on: each field defaults to what the model was trained on.
#[derive(Debug, Clone, Default)]
pub struct ModelData {
    pub dataset: Option<DatasetKind>,
    pub root: Option<PathBuf>,
    pub image_size: Option<u32>,
    pub split: Split,
}

impl ModelData {
    /// The data settings for `sidecar`'s model: the given fields first, then its training
    /// config.
    pub fn config_for(&self, sidecar: &Sidecar, model_dir: &Path) -> Result<DataConfig> {
        let trained = sidecar
            .config
            .get("data")
            .and_then(|d| serde_json::from_value::<DataConfig>(d.clone()).ok());
        let own: Option<DatasetKind> = match (&trained, &sidecar.dataset) {
            (Some(t), _) => Some(t.dataset),
            (None, Some(name)) => Some(serde_json::from_value(serde_json::Value::String(
                name.clone(),
            ))?),
            (None, None) => None,
        };
        let dataset = match (self.dataset, own) {
            // Another named dataset has other classes under the same label numbers: scoring a
            // CIFAR-10 model on ImageNette would be a number without meaning. A folder of
            // images is the user's own choice of data for the model.
            (Some(d), Some(o)) if d != o && d != DatasetKind::Folder => anyhow::bail!(
                "`dataset` {}: the model at {} was trained on {}, whose classes are not {}'s",
                d.as_str(),
                model_dir.display(),
                o.as_str(),
                d.as_str()
            ),
            (Some(d), _) => d,
            (None, Some(o)) => o,
            (None, None) => anyhow::bail!(
                "{}: the model does not say which dataset it is for; pass `dataset`",
                model_dir.display()
            ),
        };
        Ok(DataConfig {
            dataset,
            root: self
                .root
                .clone()
                .or_else(|| trained.as_ref().and_then(|t| t.root.clone())),
            image_size: self
                .image_size
                .or_else(|| trained.as_ref().and_then(|t| t.image_size)),
            skip_corrupt: false,
        })
    }

    /// The split for `sidecar`'s model ([`Self::config_for`]), loaded: an error unless it has
    /// the model's number of classes.
    pub fn load_for(&self, sidecar: &Sidecar, model_dir: &Path) -> Result<(DataConfig, ImageSet)> {
        let cfg = self.config_for(sidecar, model_dir)?;
        let data = cfg.load(self.split)?;
        if data.num_classes() != sidecar.spec.num_classes {
            anyhow::bail!(
                "the model at {} has {} classes, the {} {} split has {}",
                model_dir.display(),
                sidecar.spec.num_classes,
                data.name,
                self.split.as_str(),
                data.num_classes()
            );
        }
        Ok((cfg, data))
    }
}

/// The attacked model and its data, as paths and settings.
#[derive(Debug, Clone, Default)]
pub struct TargetSpec {
    /// A checkpoint folder, one of its files, or a training run folder.
    pub model: PathBuf,
    /// An input quantisation to this many levels in front of the model.
    pub quantize: Option<u32>,
    /// A purifier (checkpoint folder, training run, or generator file) in front of the model.
    pub purifier: Option<PathBuf>,
    /// The random transform: over the purifier's training one, or alone in front of the
    /// classifier.
    pub transform: Option<TransformKind>,
    pub transform_overrides: TransformOverrides,
    /// With a purifier, the working size it must run at; with a transform alone, its side.
    pub work_size: Option<usize>,
    /// The identity backward through the defence stages (BPDA).
    pub bpda: bool,
    pub data: ModelData,
    /// A seeded subset of this many images (None: the whole split).
    pub n: Option<usize>,
    pub seed: u64,
}

/// What a [`TargetSpec`] loads: the classifier, the purifier, the defence settings and the data.
pub struct Target {
    pub dir: PathBuf,
    pub classifier: Classifier,
    pub purifier: Option<(Purifier, PurifierSidecar)>,
    pub defence: Defence,
    /// Content hash of the classifier's and the purifier's weights and descriptions.
    pub model_hash: String,
    pub dataset: String,
    /// "cifar10 test n=512 seed=0 content HASH".
    pub data: String,
    pub class_names: Vec<String>,
    pub x: Tensor,
    pub y: Tensor,
    pub indices: Vec<usize>,
}

impl Target {
    /// The defended model on the loaded images' size.
    pub fn model(&self) -> Result<Pipeline<'_>> {
        self.model_with(&self.defence)
    }

    /// The same model with the identity backward through its defence stages (BPDA).
    pub fn bpda_model(&self) -> Result<Pipeline<'_>> {
        self.model_with(&Defence {
            bpda: true,
            ..self.defence.clone()
        })
    }

    fn model_with(&self, defence: &Defence) -> Result<Pipeline<'_>> {
        defended(
            &self.classifier,
            self.purifier.as_ref().map(|(p, s)| (p, &s.transform)),
            defence,
            (self.x.size()[2], self.x.size()[3]),
        )
    }

    /// "DIR [pipeline] weights HASH": names the attacked model for results and resume keys.
    pub fn describe(&self) -> Result<String> {
        Ok(format!(
            "{} [{}] weights {}",
            self.dir.display(),
            self.model()?.describe(),
            self.model_hash
        ))
    }
}

impl TargetSpec {
    /// Whether a defence stage stands in front of the classifier.
    pub fn has_defence(&self) -> bool {
        self.purifier.is_some() || self.transform.is_some() || self.quantize.is_some()
    }

    pub fn load(&self, device: tch::Device) -> Result<Target> {
        let dir = checkpoint::resolve(&self.model)?;
        let (classifier, sidecar) = checkpoint::load(&dir, device)?;
        let (data_cfg, mut data) = self.data.load_for(&sidecar, &dir)?;
        let indices = match self.n {
            Some(n) => seeded_subset(data.len(), n, self.seed)?,
            None => (0..data.len()).collect(),
        };
        data = data.select(&indices);
        let (x, y) = data.tensors(&(0..data.len()).collect::<Vec<_>>());
        let purifier = self
            .purifier
            .as_ref()
            .map(|path| crate::purifier::load(path, device))
            .transpose()?;
        // The transform: the purifier's training one, or the kind given, with the settings on top.
        let transform = match (&purifier, self.transform) {
            (Some((_, sidecar)), kind) => {
                let mut t = sidecar.transform.clone();
                if let Some(kind) = kind {
                    t.kind = kind;
                }
                Some(t)
            }
            (None, Some(kind)) => Some(TransformConfig::with_kind(kind)),
            (None, None) => None,
        };
        let transform = transform.map(|mut t| {
            self.transform_overrides.apply(&mut t);
            t
        });
        let defence = Defence {
            transform,
            work_size: self.work_size,
            quantize: self.quantize,
            bpda: self.bpda,
        };
        // Resume state is keyed by content: other weights or other images are another run.
        let mut weights: Vec<(String, Tensor)> = classifier.vs.variables().into_iter().collect();
        if let Some((p, _)) = &purifier {
            weights.extend(
                p.weights()
                    .variables()
                    .into_iter()
                    .map(|(k, v)| (format!("generator.{k}"), v)),
            );
        }
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        let model_hash = crate::io::fingerprint(
            &weights.iter().map(|(_, t)| t).collect::<Vec<_>>(),
            &serde_json::to_string(&(
                &classifier.spec,
                purifier.as_ref().map(|(_, s)| &s.purifier),
            ))?,
        )?;
        let data_hash = crate::io::fingerprint(&[&x, &y], "")?;
        Ok(Target {
            dir,
            classifier,
            purifier,
            defence,
            model_hash,
            dataset: data_cfg.dataset.as_str().into(),
            data: format!(
                "{} {} n={} seed={} content {data_hash}",
                data_cfg.dataset.as_str(),
                self.data.split.as_str(),
                indices.len(),
                self.seed
            ),
            class_names: data.class_names.clone(),
            x,
            y,
            indices,
        })
    }
}
