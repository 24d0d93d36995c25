//! Evaluation: clean accuracy, and robust accuracy of any model (stochastic ones scored over R
//! draws, with exact intervals).

pub mod clean;
pub mod compare;
pub mod device;
pub mod plan;
pub mod robust;
pub mod stats;
pub mod target;
