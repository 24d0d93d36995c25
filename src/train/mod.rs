//! Training: SGD and Adam optimizers whose state can be saved, learning-rate schedules, the
//! run-folder conventions (metrics.jsonl, last.json), one resumable training loop (`learner`)
//! weight averaging (`ema`) and the tasks it runs: classifiers and purifiers (checkpoints every epoch, resumable).

pub mod adam;
pub mod atop;
pub mod classifier;
pub mod ema;
pub mod learner;
pub mod optim;
pub mod purifier;
pub mod runlog;
pub mod schedule;
pub mod setup;
