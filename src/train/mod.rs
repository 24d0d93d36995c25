//! Training: an SGD optimizer whose state can be saved, learning-rate schedules, and the
//! classifier trainer (checkpoints every epoch, resumable, metrics.jsonl, curves).

pub mod classifier;
pub mod optim;
pub mod schedule;
