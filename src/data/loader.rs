//! The batch iterator: seeded shuffling, optional drop-last, and augmentation on worker threads.
//!
//! Worker `k` builds batches k, k+W, k+2W, ... and hands them over through its own bounded
//! channel, so batches arrive in order without a reorder buffer and at most `prefetch` per worker
//! wait in memory. Every sample's augmentation RNG is seeded from (seed, epoch, position), so an
//! epoch's batches are identical whatever the number of workers.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::augment::Augment;
use super::subset::{mix, permutation};
use super::{ImageSet, hwc_u8_to_tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    pub batch_size: usize,
    #[serde(default)]
    pub shuffle: bool,
    #[serde(default)]
    pub drop_last: bool,
    #[serde(default)]
    pub augment: Augment,
    #[serde(default)]
    pub seed: u64,
    /// Worker threads; 0 = one per core.
    #[serde(default)]
    pub workers: usize,
    /// Batches each worker may have ready ahead of the consumer.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

fn default_prefetch() -> usize {
    2
}

impl LoaderConfig {
    /// In order, no augmentation: for evaluation.
    pub fn eval(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            augment: Augment::None,
            seed: 0,
            workers: 0,
            prefetch: default_prefetch(),
        }
    }

    /// Shuffled with augmentation: for training.
    pub fn train(batch_size: usize, augment: Augment, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: true,
            augment,
            seed,
            workers: 0,
            prefetch: default_prefetch(),
        }
    }
}

/// One batch: f32 N x 3 x H x W images in [0,1] (CPU), i64 labels, and the dataset indices.
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub indices: Vec<usize>,
}

pub struct Loader {
    data: Arc<ImageSet>,
    cfg: LoaderConfig,
}

impl Loader {
    pub fn new(data: Arc<ImageSet>, cfg: LoaderConfig) -> Self {
        assert!(cfg.batch_size > 0, "batch_size must be positive");
        Loader { data, cfg }
    }

    pub fn data(&self) -> &ImageSet {
        &self.data
    }

    pub fn batches_per_epoch(&self) -> usize {
        let n = self.data.len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// The batches of epoch `epoch` (the epoch number feeds the shuffle and augmentation seeds).
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let n = self.data.len();
        let order: Arc<Vec<usize>> = Arc::new(if self.cfg.shuffle {
            permutation(n, mix(&[self.cfg.seed, epoch]))
        } else {
            (0..n).collect()
        });
        let num_batches = self.batches_per_epoch();
        let workers = match self.cfg.workers {
            0 => crate::runtime::threads(),
            w => w,
        }
        .clamp(1, num_batches.max(1));
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for k in 0..workers {
            let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
            let job = Job {
                data: self.data.clone(),
                order: order.clone(),
                cfg: self.cfg.clone(),
                epoch,
                first: k,
                step: workers,
                num_batches,
            };
            handles.push(std::thread::spawn(move || job.run(tx)));
            receivers.push(rx);
        }
        EpochIter {
            receivers,
            handles,
            next: 0,
            num_batches,
        }
    }
}

struct Job {
    data: Arc<ImageSet>,
    order: Arc<Vec<usize>>,
    cfg: LoaderConfig,
    epoch: u64,
    first: usize,
    step: usize,
    num_batches: usize,
}

impl Job {
    fn run(self, tx: SyncSender<Batch>) {
        let (h, w) = (self.data.height, self.data.width);
        let (oh, ow) = self.cfg.augment.output_size(h, w);
        let out_bytes = oh * ow * 3;
        let n = self.data.len();
        let mut b = self.first;
        while b < self.num_batches {
            let start = b * self.cfg.batch_size;
            let end = (start + self.cfg.batch_size).min(n);
            let indices: Vec<usize> = self.order[start..end].to_vec();
            let mut buf = vec![0u8; indices.len() * out_bytes];
            for (pos, (&i, dst)) in indices.iter().zip(buf.chunks_mut(out_bytes)).enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(&[
                    self.cfg.seed,
                    self.epoch,
                    (start + pos) as u64,
                ]));
                self.cfg
                    .augment
                    .apply(self.data.image(i), h, w, dst, &mut rng);
            }
            let labels: Vec<i64> = indices.iter().map(|&i| self.data.labels[i]).collect();
            let batch = Batch {
                images: hwc_u8_to_tensor(&buf, indices.len(), oh, ow),
                labels: Tensor::from_slice(&labels),
                indices,
            };
            if tx.send(batch).is_err() {
                return; // the consumer stopped early
            }
            b += self.step;
        }
    }
}

pub struct EpochIter {
    receivers: Vec<Receiver<Batch>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    num_batches: usize,
}

impl Iterator for EpochIter {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.num_batches {
            return None;
        }
        let k = self.next % self.receivers.len();
        self.next += 1;
        // A closed channel means the worker panicked: surface that instead of a short epoch.
        Some(self.receivers[k].recv().expect("data loader worker died"))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.num_batches - self.next;
        (left, Some(left))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the channels makes blocked workers return; then join them.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
