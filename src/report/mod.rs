//! Reports: image grids now; tables and plots as the pipeline grows.

pub mod grid;
pub mod plot;
pub mod robust;
