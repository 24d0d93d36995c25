//! The loaders on the real shared data (ATOP_DATA_DIR): counts, class order, pixel statistics.

mod common;

use atop::data::{DataConfig, DatasetKind, Split};

const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

fn cifar10() -> DataConfig {
    DataConfig {
        root: Some(common::cifar10_jpg()),
        ..DataConfig::new(DatasetKind::Cifar10)
    }
}

#[test]
fn cifar10_train_has_50000_images_5000_per_class_in_official_order() {
    let set = cifar10().load(Split::Train).unwrap();
    assert_eq!(set.len(), 50_000);
    assert_eq!((set.height, set.width), (32, 32));
    assert_eq!(set.pixels.len(), 50_000 * 32 * 32 * 3);
    assert_eq!(set.classes, CIFAR10_CLASSES);
    assert_eq!(set.class_counts(), vec![5000; 10]);
    assert!(set.skipped.is_empty());
    // Per-channel means of CIFAR-10 train are about (0.491, 0.482, 0.447): right decoding and
    // channel order, not just the right count. (This copy is JPEG, so allow a little slack.)
    let mut sums = [0u64; 3];
    for (i, &v) in set.pixels.iter().enumerate() {
        sums[i % 3] += v as u64;
    }
    let means: Vec<f64> = sums
        .iter()
        .map(|&s| s as f64 / (50_000.0 * 1024.0 * 255.0))
        .collect();
    for (m, want) in means.iter().zip([0.4914, 0.4822, 0.4465]) {
        assert!((m - want).abs() < 0.01, "channel means {means:?}");
    }
}

#[test]
fn cifar10_test_has_10000_images_1000_per_class() {
    let set = cifar10().load(Split::Test).unwrap();
    assert_eq!(set.len(), 10_000);
    assert_eq!(set.classes, CIFAR10_CLASSES);
    assert_eq!(set.class_counts(), vec![1000; 10]);
}

#[test]
fn cifar10_found_through_atop_data_dir_without_root() {
    common::data_dir();
    let set = DataConfig::new(DatasetKind::Cifar10)
        .load(Split::Test)
        .unwrap();
    assert_eq!(set.len(), 10_000);
    assert!(
        set.source.ends_with("cifar10-jpg.tar.gz"),
        "{}",
        set.source.display()
    );
}

#[test]
fn imagenette_splits_have_the_published_sizes_and_greyscale_becomes_rgb() {
    let cfg = DataConfig {
        root: Some(common::imagenette_tar()),
        image_size: Some(64),
        ..DataConfig::new(DatasetKind::Imagenette)
    };
    let train = cfg.load(Split::Train).unwrap();
    assert_eq!(train.len(), 9_469);
    assert_eq!((train.height, train.width), (64, 64));
    assert_eq!(train.pixels.len(), 9_469 * 64 * 64 * 3);
    assert_eq!(train.classes[9], "n03888257");
    assert_eq!(train.class_names[0], "tench");
    assert_eq!(train.class_names[9], "parachute");
    let val = cfg.load(Split::Test).unwrap();
    assert_eq!(val.len(), 3_925);
    // The copy has 242 greyscale JPEGs: they load (as R = G = B), nothing is skipped.
    let grey = (0..train.len() + val.len())
        .filter(|&i| {
            let img = if i < train.len() {
                train.image(i)
            } else {
                val.image(i - train.len())
            };
            img.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2])
        })
        .count();
    assert!((242..=260).contains(&grey), "{grey} grey images");
    assert!(train.skipped.is_empty() && val.skipped.is_empty());
}

#[test]
fn imagenette_default_size_is_224() {
    let cfg = DataConfig {
        root: Some(common::imagenette_tar()),
        ..DataConfig::new(DatasetKind::Imagenette)
    };
    let val = cfg.load(Split::Test).unwrap();
    assert_eq!((val.height, val.width), (224, 224));
    assert_eq!(val.class_counts().iter().sum::<usize>(), 3_925);
}

#[test]
fn tensors_are_nchw_floats_in_unit_range_matching_the_bytes() {
    let set = cifar10().load(Split::Test).unwrap();
    let (x, y) = set.tensors(&[0, 9_999]);
    assert_eq!(x.size(), vec![2, 3, 32, 32]);
    assert_eq!(x.kind(), tch::Kind::Float);
    assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![0, 9]);
    let px = set.image(9_999);
    // Channel c of pixel (row 5, col 7) of image 1.
    for c in 0..3 {
        let v = x.double_value(&[1, c, 5, 7]);
        assert!((v - px[(5 * 32 + 7) * 3 + c as usize] as f64 / 255.0).abs() < 1e-6);
    }
    assert!(x.min().double_value(&[]) >= 0.0 && x.max().double_value(&[]) <= 1.0);
}
