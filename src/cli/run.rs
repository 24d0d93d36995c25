//! `atop run`: a whole study (classifier, purifier, AToP fine-tuning, the evaluation of both
//! defended models, one report) from a preset or a TOML file.

use std::path::PathBuf;

use anyhow::{Result, bail};
use atop::study::{StudyConfig, StudyPlan};
use clap::Args as ClapArgs;

use super::Global;

#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    /// A named study: cpu-15min (under 10 minutes on 2 CPU cores), cpu-study (the CPU study of
    /// docs/atop.md, about 3 hours), paper-gpu (the paper's settings, for a GPU).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// A study in a TOML file (the format of presets/run-cpu-15min.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Study folder (default: runs/study-<preset or file name>); rerunning the same command
    /// resumes it.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: RunArgs, global: &Global) -> Result<()> {
    let (cfg, name) = match (&a.preset, &a.config) {
        (Some(name), _) => (StudyConfig::preset(name)?, name.clone()),
        (None, Some(path)) => (
            StudyConfig::from_file(path)?,
            path.file_stem()
                .map_or("file".into(), |s| s.to_string_lossy().into_owned()),
        ),
        (None, None) => bail!("say which study: --preset NAME (e.g. cpu-15min) or --config FILE"),
    };
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("study-{name}")));
    let out = atop::folder::absolute(&out);
    let plan = StudyPlan::new(&cfg, &out)?;
    let summary = atop::study::run(&plan, &out, global.device)?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    print!("{}", atop::study::markdown(&summary));
    Ok(())
}
