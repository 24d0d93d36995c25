//! `atop import`: a PyTorch checkpoint (.pt/.pth) -> atop's safetensors + JSON, without running
//! any pickled code.

use std::path::PathBuf;

use anyhow::Result;
use atop::data::DatasetKind;
use atop::models::Arch;
use atop::models::pytorch::{self, ImportSpec, Normalisation};
use clap::Args as ClapArgs;

use super::Global;

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
    let done = pytorch::import(&ImportSpec {
        input: a.input.clone(),
        arch: a.arch,
        num_classes: a.num_classes,
        dataset: a.dataset,
        normalisation: a.normalisation,
        out: a.out,
        force: a.force,
    })?;
    if global.json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        println!(
            "{} -> {} ({}, {} parameters)",
            a.input.display(),
            done.out.display(),
            done.arch,
            done.parameters
        );
    }
    Ok(())
}
