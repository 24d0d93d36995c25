//! Evaluation: clean accuracy now; robust accuracy under attack comes with the attack suite.

pub mod clean;
