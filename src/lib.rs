//! atop: adversarial purification (AToP, Lin et al., ICLR 2024) and a trustworthy attack suite,
//! on libtorch via tch.
//!
//! The modules read as the pipeline: `data -> models -> transforms -> purifier -> attacks ->
//! train -> eval -> report -> study` (`atop run`: every stage in one command), with `runtime`
//! (device, threads), `io` and `folder` (the rule every run folder follows) underneath, `bench` (timings against the PyTorch references) on the
//! floor of `study`, and the CLI on top.

pub mod attacks;
pub mod bench;
pub mod data;
pub mod eval;
pub mod figures;
pub mod folder;
pub mod io;
pub mod models;
pub mod progress;
pub mod purifier;
pub mod report;
pub mod runtime;
pub mod study;
pub mod train;
pub mod transforms;
