//! Figures written as PNG: image grids (clean, adversarial, purified, with labels) and line
//! charts. Low level, so trainers and evaluators both draw with it.

pub mod grid;
pub mod plot;
