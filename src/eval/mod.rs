//! Evaluation: robust accuracy of any model (stochastic ones scored over R draws, with exact
//! intervals), paired comparisons of two evaluations, the device check. Clean accuracy is a
//! measurement of the model ([`crate::models::accuracy`]).

pub mod attack;
pub mod checks;
pub mod clean;
pub mod compare;
pub mod defaults;
pub mod device;
pub mod plan;
pub mod robust;
pub mod run;
pub mod scores;
pub mod spec;
pub mod state;
pub mod stats;
pub mod target;
