//! Seeded subsets and the batch iterator on the real CIFAR-10 copy.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use atop::data::augment::Augment;
use atop::data::loader::{Loader, LoaderConfig};
use atop::data::subset::{permutation, seeded_subset};
use atop::data::{DataConfig, DatasetKind, ImageSet, Split};

fn cifar_test() -> Arc<ImageSet> {
    let set = DataConfig {
        root: Some(common::cifar10_jpg()),
        ..DataConfig::new(DatasetKind::Cifar10)
    }
    .load(Split::Test)
    .unwrap();
    Arc::new(set)
}

#[test]
fn seeded_subset_is_fixed_distinct_sorted_and_seed_dependent() {
    let a = seeded_subset(10_000, 512, 0).unwrap();
    assert_eq!(a, seeded_subset(10_000, 512, 0).unwrap());
    assert_eq!(a.len(), 512);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    assert!(*a.last().unwrap() < 10_000);
    assert_ne!(a, seeded_subset(10_000, 512, 1).unwrap());
    // The same on every machine: this pins the stream (ChaCha8 + rand's shuffle, locked versions).
    assert_eq!(seeded_subset(10_000, 5, 0).unwrap(), GOLDEN_SUBSET);
    assert_eq!(seeded_subset(7, 7, 3).unwrap(), (0..7).collect::<Vec<_>>());
    let err = seeded_subset(10, 11, 0).unwrap_err().to_string();
    assert!(err.contains("subset") && err.contains("11"), "{err}");
}

const GOLDEN_SUBSET: [usize; 5] = [73, 450, 4284, 6545, 7090];

#[test]
fn an_epoch_visits_every_image_once_in_a_seeded_order() {
    let data = cifar_test();
    let cfg = LoaderConfig {
        drop_last: false,
        ..LoaderConfig::train(128, Augment::cifar(), 5)
    };
    let loader = Loader::new(data.clone(), cfg.clone());
    assert_eq!(loader.batches_per_epoch(), 79);
    let batches: Vec<_> = loader.epoch(0).collect();
    assert_eq!(batches.len(), 79);
    assert_eq!(batches.last().unwrap().indices.len(), 10_000 - 78 * 128);
    let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen.len(), 10_000);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 10_000);
    assert_eq!(seen, permutation(10_000, atop::data::subset::mix(&[5, 0])));
    // Labels match the indices.
    let b = &batches[3];
    let labels = Vec::<i64>::try_from(&b.labels).unwrap();
    assert_eq!(
        labels,
        b.indices
            .iter()
            .map(|&i| data.labels[i])
            .collect::<Vec<_>>()
    );
    // Another epoch is another order.
    let next: Vec<usize> = loader.epoch(1).next().unwrap().indices;
    assert_ne!(next, batches[0].indices);
    // drop_last drops the partial batch.
    let dl = Loader::new(data, LoaderConfig::train(128, Augment::None, 5));
    assert_eq!(dl.epoch(0).count(), 78);
}

#[test]
fn batches_do_not_depend_on_the_number_of_workers() {
    let data = cifar_test();
    let run = |workers| {
        let cfg = LoaderConfig {
            workers,
            ..LoaderConfig::train(64, Augment::cifar(), 11)
        };
        Loader::new(data.clone(), cfg)
            .epoch(2)
            .take(7)
            .map(|b| b.images)
            .collect::<Vec<_>>()
    };
    let one = run(1);
    let three = run(3);
    for (a, b) in one.iter().zip(&three) {
        assert!(a.equal(b));
    }
}

#[test]
fn crop_flip_keeps_shape_and_range_and_changes_pixels_plausibly() {
    let data = cifar_test();
    let eval = Loader::new(data.clone(), LoaderConfig::eval(256));
    let plain = eval.epoch(0).next().unwrap();
    assert_eq!(plain.images.size(), vec![256, 3, 32, 32]);
    assert_eq!(plain.indices, (0..256).collect::<Vec<_>>());
    let (want, _) = data.tensors(&plain.indices);
    assert!(
        plain.images.equal(&want),
        "no augmentation = the stored images"
    );

    let cfg = LoaderConfig {
        shuffle: false,
        ..LoaderConfig::train(256, Augment::cifar(), 0)
    };
    let aug = Loader::new(data, cfg).epoch(0).next().unwrap();
    assert_eq!(aug.images.size(), vec![256, 3, 32, 32]);
    assert!(aug.images.min().double_value(&[]) >= 0.0 && aug.images.max().double_value(&[]) <= 1.0);
    // An image is unchanged only with offset (0, 0) and no flip: 1/81 * 1/2 of the time, so a
    // few of 256 (not none, not most).
    let same = (0..256)
        .filter(|&i| aug.images.get(i).equal(&plain.images.get(i)))
        .count();
    assert!(same < 12, "{same} of 256 unchanged");
}

#[test]
fn resized_crop_outputs_the_requested_size() {
    let data = cifar_test();
    let cfg = LoaderConfig::train(16, Augment::resized_crop(24), 0);
    let b = Loader::new(data, cfg).epoch(0).next().unwrap();
    assert_eq!(b.images.size(), vec![16, 3, 24, 24]);
}
