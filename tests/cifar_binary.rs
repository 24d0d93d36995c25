//! CIFAR-10/100 binary loaders on files the tests write: layout, both CIFAR-100 labels, archives,
//! a round trip of real images, and every kind of bad input.

mod common;

use atop::data::cifar::{CifarFormat, load};
use atop::data::{DataConfig, DataError, DatasetKind, Split};
use common::*;

const NAMES10: &str = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n";

fn names(prefix: &str, n: usize) -> String {
    (0..n).map(|i| format!("{prefix}{i}\n")).collect()
}

/// CIFAR-100's two name files: fine0..fine99 and coarse0..coarse19.
fn write_cifar100_names(dir: &std::path::Path) {
    write(
        &dir.join("fine_label_names.txt"),
        names("fine", 100).as_bytes(),
    );
    write(
        &dir.join("coarse_label_names.txt"),
        names("coarse", 20).as_bytes(),
    );
}

type Labelled = Vec<(u8, image::RgbImage)>;

/// A CIFAR-10 binary folder with `per_file` records in each of the six files; returns the
/// images in file order for train and test.
fn write_cifar10(dir: &std::path::Path, per_file: usize) -> (Labelled, Labelled) {
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (f, name) in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ]
    .iter()
    .enumerate()
    {
        let mut bytes = Vec::new();
        for r in 0..per_file {
            let label = ((f * per_file + r) % 10) as u8;
            let img = pattern(32, 32, (f * 31 + r) as u8);
            bytes.extend(cifar_record(&[label], &img));
            if f < 5 {
                train.push((label, img))
            } else {
                test.push((label, img))
            }
        }
        write(&dir.join(name), &bytes);
    }
    write(&dir.join("batches.meta.txt"), NAMES10.as_bytes());
    (train, test)
}

#[test]
fn cifar10_binary_pixels_labels_and_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, test) = write_cifar10(tmp.path(), 3);
    let set = load(tmp.path(), CifarFormat::Cifar10, Split::Train)
        .unwrap()
        .unwrap();
    assert_eq!(set.len(), 15);
    assert_eq!(set.classes[1], "automobile");
    assert_eq!(set.classes.len(), 10);
    for (i, (label, img)) in train.iter().enumerate() {
        assert_eq!(set.labels[i], *label as i64);
        assert_eq!(
            set.image(i),
            img.as_raw().as_slice(),
            "image {i}: planes must become HWC"
        );
    }
    let set = load(tmp.path(), CifarFormat::Cifar10, Split::Test)
        .unwrap()
        .unwrap();
    assert_eq!(set.len(), 3);
    assert_eq!(set.image(2), test[2].1.as_raw().as_slice());
}

#[test]
fn cifar10_binary_inside_the_official_subfolder_and_in_a_tar_gz() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = tmp.path().join("cifar-10-batches-bin");
    let (_, test) = write_cifar10(&inner, 2);
    let cfg = DataConfig {
        root: Some(tmp.path().to_path_buf()),
        ..DataConfig::new(DatasetKind::Cifar10)
    };
    let from_dir = cfg.load(Split::Test).unwrap();
    assert_eq!(from_dir.image(1), test[1].1.as_raw().as_slice());

    let mut files = Vec::new();
    for entry in std::fs::read_dir(&inner).unwrap() {
        let entry = entry.unwrap();
        files.push((
            format!(
                "cifar-10-batches-bin/{}",
                entry.file_name().to_string_lossy()
            ),
            std::fs::read(entry.path()).unwrap(),
        ));
    }
    files.sort();
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    write_tar(&archive, &files, true);
    let from_tar = DataConfig {
        root: Some(archive),
        ..DataConfig::new(DatasetKind::Cifar10)
    }
    .load(Split::Train)
    .unwrap();
    assert_eq!(from_tar.len(), 10);
    let from_dir = cfg.load(Split::Train).unwrap();
    assert_eq!(from_tar.pixels, from_dir.pixels);
    assert_eq!(from_tar.labels, from_dir.labels);
}

#[test]
fn cifar100_keeps_fine_and_coarse_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    let records = [(3u8, 97u8), (19, 0), (0, 55)];
    for (i, (coarse, fine)) in records.iter().enumerate() {
        bytes.extend(cifar_record(&[*coarse, *fine], &pattern(32, 32, i as u8)));
    }
    write(&tmp.path().join("train.bin"), &bytes);
    write(&tmp.path().join("test.bin"), &bytes[..3074]);
    write_cifar100_names(tmp.path());
    let set = load(tmp.path(), CifarFormat::Cifar100, Split::Train)
        .unwrap()
        .unwrap();
    assert_eq!(set.labels, vec![97, 0, 55]);
    let coarse = set.coarse.as_ref().unwrap();
    assert_eq!(coarse.labels, vec![3, 19, 0]);
    assert_eq!(coarse.classes.len(), 20);
    assert_eq!(set.classes[97], "fine97");
    assert_eq!(set.image(2), pattern(32, 32, 2).as_raw().as_slice());
    let test = load(tmp.path(), CifarFormat::Cifar100, Split::Test)
        .unwrap()
        .unwrap();
    assert_eq!(test.len(), 1);
    // A subset keeps both label kinds aligned.
    let sub = set.select(&[2, 0]);
    assert_eq!(sub.labels, vec![55, 97]);
    assert_eq!(sub.coarse.unwrap().labels, vec![0, 3]);
}

#[test]
fn real_cifar10_images_round_trip_through_the_binary_format() {
    // Real images (the shared JPEG copy) written as official records must read back unchanged.
    let real = DataConfig {
        root: Some(cifar10_jpg()),
        ..DataConfig::new(DatasetKind::Cifar10)
    }
    .load(Split::Test)
    .unwrap();
    let idx = atop::data::subset::seeded_subset(real.len(), 200, 7).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    for &i in &idx {
        let img = image::RgbImage::from_raw(32, 32, real.image(i).to_vec()).unwrap();
        bytes.extend(cifar_record(&[real.labels[i] as u8], &img));
    }
    write(&tmp.path().join("test_batch.bin"), &bytes);
    write(&tmp.path().join("batches.meta.txt"), NAMES10.as_bytes());
    let back = load(tmp.path(), CifarFormat::Cifar10, Split::Test)
        .unwrap()
        .unwrap();
    let want = real.select(&idx);
    assert_eq!(back.pixels, want.pixels);
    assert_eq!(back.labels, want.labels);
}

fn err_of(dir: &std::path::Path, format: CifarFormat, split: Split) -> (DataError, String) {
    let e = load(dir, format, split).expect_err("must fail");
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn truncated_bin_names_file_size_and_record_size() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), 2);
    let path = tmp.path().join("test_batch.bin");
    let bytes = std::fs::read(&path).unwrap();
    write(&path, &bytes[..bytes.len() - 100]);
    let (e, msg) = err_of(tmp.path(), CifarFormat::Cifar10, Split::Test);
    assert!(
        matches!(
            e,
            DataError::BadRecordSize {
                size: 6046,
                record: 3073,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("test_batch.bin") && msg.contains("3073"),
        "{msg}"
    );
    // The same bytes read as CIFAR-100 records are also not whole records.
    write(&tmp.path().join("test.bin"), &bytes[..3073]);
    write_cifar100_names(tmp.path());
    let (_, msg) = err_of(tmp.path(), CifarFormat::Cifar100, Split::Test);
    assert!(msg.contains("3074-byte records"), "{msg}");
}

#[test]
fn label_out_of_range_names_file_record_and_value() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), 2);
    let mut bytes = std::fs::read(tmp.path().join("data_batch_3.bin")).unwrap();
    bytes[3073] = 10; // record 1
    write(&tmp.path().join("data_batch_3.bin"), &bytes);
    let (e, msg) = err_of(tmp.path(), CifarFormat::Cifar10, Split::Train);
    assert!(
        matches!(
            e,
            DataError::LabelOutOfRange {
                record: 1,
                label: 10,
                num_classes: 10,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("data_batch_3.bin"), "{msg}");

    let tmp = tempfile::tempdir().unwrap();
    write(
        &tmp.path().join("test.bin"),
        &cifar_record(&[20, 5], &pattern(32, 32, 0)),
    );
    write_cifar100_names(tmp.path());
    let (e, msg) = err_of(tmp.path(), CifarFormat::Cifar100, Split::Test);
    assert!(
        matches!(
            e,
            DataError::LabelOutOfRange {
                which: "coarse",
                label: 20,
                num_classes: 20,
                ..
            }
        ),
        "{msg}"
    );
}

#[test]
fn missing_or_wrong_meta_and_missing_batches_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), 1);
    std::fs::remove_file(tmp.path().join("batches.meta.txt")).unwrap();
    let (_, msg) = err_of(tmp.path(), CifarFormat::Cifar10, Split::Test);
    assert!(
        msg.contains("batches.meta.txt") && msg.contains("not found"),
        "{msg}"
    );

    write(&tmp.path().join("batches.meta.txt"), b"cat\ndog\n");
    let (_, msg) = err_of(tmp.path(), CifarFormat::Cifar10, Split::Test);
    assert!(msg.contains("lists 2 class names, expected 10"), "{msg}");

    write(&tmp.path().join("batches.meta.txt"), NAMES10.as_bytes());
    std::fs::remove_file(tmp.path().join("data_batch_4.bin")).unwrap();
    let (_, msg) = err_of(tmp.path(), CifarFormat::Cifar10, Split::Train);
    assert!(msg.contains("data_batch_4.bin"), "{msg}");
}

#[test]
fn missing_root_is_a_clear_error() {
    let err = DataConfig {
        root: Some("/nonexistent/cifar".into()),
        ..DataConfig::new(DatasetKind::Cifar100)
    }
    .load(Split::Train)
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/nonexistent/cifar") && err.contains("not found"),
        "{err}"
    );
}
