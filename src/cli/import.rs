//! `atop import`: a PyTorch checkpoint (.pt/.pth) -> atop's safetensors + JSON, without running
//! any pickled code.

use std::path::PathBuf;

use anyhow::{Context, Result};
use atop::data::DatasetKind;
use atop::models::checkpoint::{self, Sidecar};
use atop::models::{Arch, Classifier, ModelSpec, dataset_normalisation, pytorch};
use clap::Args as ClapArgs;

use super::Global;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Normalisation {
    /// The dataset's mean/std (models trained on normalised inputs, e.g. torchvision-style).
    Dataset,
    /// None: the model takes [0,1] images directly (RobustBench models).
    None,
}

#[derive(Debug, ClapArgs)]
pub struct ImportArgs {
    /// The PyTorch checkpoint: a state dict, or a dict with one under "state_dict".
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub arch: Arch,
    #[arg(long)]
    pub num_classes: usize,
    #[arg(long, value_enum)]
    pub dataset: DatasetKind,
    /// What the model expects its [0,1] input to be normalised with.
    #[arg(long, value_enum, default_value = "dataset")]
    pub normalisation: Normalisation,
    /// Output folder for model.safetensors + model.json (new or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the checkpoint already in --out.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ImportArgs, global: &Global) -> Result<()> {
    // Never over an existing checkpoint (or anything else) unless asked to.
    let own: &[&str] = if a.force {
        &["model.safetensors", "model.json"]
    } else {
        &[]
    };
    atop::io::check_output_dir(&a.out, own, "--out")
        .map_err(|e| anyhow::anyhow!("{e:#} (or pass --force to replace a checkpoint there)"))?;
    let (mean, std) = match a.normalisation {
        Normalisation::Dataset => dataset_normalisation(a.dataset),
        Normalisation::None => ([0.0; 3], [1.0; 3]),
    };
    let spec = ModelSpec::new(a.arch, a.num_classes, mean, std)?;
    let tensors = pytorch::read_state_dict(&a.input)?;
    let mut model = Classifier::new(spec.clone(), tch::Device::Cpu);
    checkpoint::copy_named(&mut model, tensors, &a.input)?;
    let config = serde_json::json!({
        "imported_from": a.input.display().to_string(),
        "normalisation": format!("{:?}", a.normalisation).to_lowercase(),
    });
    let classes = (0..a.num_classes).map(|i| i.to_string()).collect();
    let sidecar = Sidecar::new(spec, Some(a.dataset.as_str().into()), classes, None, config);
    checkpoint::save(&model, &sidecar, &a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    if global.json {
        println!(
            "{}",
            serde_json::json!({"out": a.out, "arch": a.arch.to_string(), "parameters": model.num_parameters()})
        );
    } else {
        println!(
            "{} -> {} ({}, {} parameters)",
            a.input.display(),
            a.out.display(),
            a.arch,
            model.num_parameters()
        );
    }
    Ok(())
}
