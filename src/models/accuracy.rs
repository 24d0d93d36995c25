//! Clean accuracy, per-class accuracy, mean loss and the confusion matrix of a classifier: a
//! measurement of a model, below the trainers (which score each epoch with it) and `eval`.

use std::sync::Arc;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::Model;
use crate::data::ImageSet;
use crate::data::loader::{Loader, LoaderConfig};
use crate::runtime::{Precision, autocast};

#[derive(Debug, Clone, Serialize)]
pub struct CleanReport {
    pub images: usize,
    pub accuracy: f64,
    pub loss: f64,
    pub per_class_accuracy: Vec<f64>,
    /// counts[true][predicted].
    pub confusion: Vec<Vec<usize>>,
}

/// Evaluates `model` (eval mode, no gradients) on every image of `data`; a stochastic model
/// (a classifier behind a random transform) gets one draw per image. `precision` applies
/// autocast to the forward pass (bf16 is about 2x faster on CPUs with AVX512-BF16).
pub fn evaluate(
    model: &dyn Model,
    data: Arc<ImageSet>,
    batch_size: usize,
    device: Device,
    precision: Precision,
) -> anyhow::Result<CleanReport> {
    let k = model.num_classes();
    if data.num_classes() != k {
        anyhow::bail!(
            "the model has {k} classes ({}), the {} {} split has {}",
            model.describe(),
            data.name,
            data.split.as_str(),
            data.num_classes()
        );
    }
    let mut confusion = vec![vec![0usize; k]; k];
    let mut loss_sum = 0.0;
    let loader = Loader::new(data.clone(), LoaderConfig::eval(batch_size));
    for batch in loader.epoch(0) {
        let (x, y) = (
            batch.images.to_device(device),
            batch.labels.to_device(device),
        );
        let logits =
            tch::no_grad(|| autocast(device, precision, || model.logits(&x))).to_kind(Kind::Float);
        loss_sum +=
            logits.cross_entropy_for_logits(&y).double_value(&[]) * batch.indices.len() as f64;
        let pred = Vec::<i64>::try_from(
            logits
                .argmax(-1, false)
                .to_device(Device::Cpu)
                .to_kind(Kind::Int64),
        )
        .expect("i64 predictions");
        for (p, &i) in pred.iter().zip(&batch.indices) {
            confusion[data.labels[i] as usize][*p as usize] += 1;
        }
    }
    let n = data.len();
    let correct: usize = (0..k).map(|c| confusion[c][c]).sum();
    Ok(CleanReport {
        images: n,
        accuracy: correct as f64 / n.max(1) as f64,
        loss: loss_sum / n.max(1) as f64,
        per_class_accuracy: confusion
            .iter()
            .enumerate()
            .map(|(c, row)| row[c] as f64 / row.iter().sum::<usize>().max(1) as f64)
            .collect(),
        confusion,
    })
}

/// How many of `images` (in [0,1], held in memory) `model` classifies as `labels`, in batches
/// moved to `device`, without gradients (one draw per image for a stochastic model).
pub fn count_correct(
    model: &dyn Model,
    images: &Tensor,
    labels: &Tensor,
    batch_size: usize,
    device: Device,
    precision: Precision,
) -> i64 {
    let n = images.size()[0];
    let mut hit = 0;
    for start in (0..n).step_by(batch_size.max(1)) {
        let len = (n - start).min(batch_size.max(1) as i64);
        let x = images.narrow(0, start, len).to_device(device);
        let y = labels.narrow(0, start, len).to_device(device);
        hit += tch::no_grad(|| autocast(device, precision, || model.logits(&x)))
            .argmax(-1, false)
            .eq_tensor(&y)
            .sum(Kind::Int64)
            .int64_value(&[]);
    }
    hit
}
