//! Image-folder datasets on trees the tests write: folder vs archive equivalence, colour
//! conversions, resizing, and bad input (corrupt, non-image, empty class, missing split).

mod common;

use std::path::Path;

use atop::data::folder::{FolderOptions, load, resize_center_crop};
use atop::data::{DataError, Split};
use common::*;

/// train/{cat,dog}/ with 3 and 2 PNG/JPEG images of 8x8, test/{cat,dog} with one each.
fn small_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for (split, per) in [("train", [3usize, 2]), ("test", [1, 1])] {
        for (c, class) in ["cat", "dog"].iter().enumerate() {
            for i in 0..per[c] {
                let img = pattern(8, 8, (c * 10 + i) as u8);
                let (name, bytes) = if i % 2 == 0 {
                    (format!("{split}/{class}/{i:03}.png"), png_bytes(&img))
                } else {
                    (format!("{split}/{class}/{i:03}.JPEG"), jpeg_bytes(&img))
                };
                write(&root.join(&name), &bytes);
                files.push((name, bytes));
            }
        }
    }
    files
}

fn opts() -> FolderOptions {
    FolderOptions::default()
}

#[test]
fn folder_classes_sorted_files_sorted_png_exact() {
    let tmp = tempfile::tempdir().unwrap();
    small_tree(tmp.path());
    let set = load(tmp.path(), Split::Train, &opts()).unwrap();
    assert_eq!(set.classes, vec!["cat", "dog"]);
    assert_eq!(set.labels, vec![0, 0, 0, 1, 1]);
    assert_eq!((set.height, set.width), (8, 8));
    // PNG is lossless: image 0 is exactly the pattern; JPEG (image 1) is close.
    assert_eq!(set.image(0), pattern(8, 8, 0).as_raw().as_slice());
    let want = pattern(8, 8, 1);
    let max_diff = set
        .image(1)
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(max_diff < 40, "JPEG differs by {max_diff}");
    let test = load(tmp.path(), Split::Test, &opts()).unwrap();
    assert_eq!(test.labels, vec![0, 1]);
}

#[test]
fn tar_tar_gz_nested_folder_and_val_alias_read_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let files = small_tree(&tree);
    let from_dir = load(&tree, Split::Train, &opts()).unwrap();
    for (name, gzip) in [("a.tar", false), ("a.tar.gz", true)] {
        let archive = tmp.path().join(name);
        write_tar(&archive, &files, gzip);
        let from_tar = load(&archive, Split::Train, &opts()).unwrap();
        assert_eq!(from_tar.classes, from_dir.classes);
        assert_eq!(from_tar.labels, from_dir.labels);
        assert_eq!(from_tar.pixels, from_dir.pixels);
    }
    // One top folder, and `val` instead of `test`, in an archive and on disk.
    let nested: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(n, b)| (format!("top/{}", n.replace("test/", "val/")), b.clone()))
        .collect();
    let archive = tmp.path().join("nested.tgz");
    write_tar(&archive, &nested, true);
    let from_tar = load(&archive, Split::Test, &opts()).unwrap();
    let extracted = tmp.path().join("extracted");
    for (n, b) in &nested {
        write(&extracted.join(n), b);
    }
    let from_dir = load(&extracted, Split::Test, &opts()).unwrap();
    assert_eq!(from_tar.len(), 2);
    assert_eq!(from_tar.pixels, from_dir.pixels);
}

#[test]
fn greyscale_cmyk_and_alpha_become_rgb() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("train/only");
    let grey = image::GrayImage::from_fn(16, 12, |x, _| image::Luma([(x * 10) as u8]));
    let mut buf = std::io::Cursor::new(Vec::new());
    grey.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    write(&dir.join("a_grey.jpg"), buf.get_ref());
    let rgba = image::RgbaImage::from_pixel(16, 12, image::Rgba([10, 200, 30, 0]));
    let mut buf = std::io::Cursor::new(Vec::new());
    rgba.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    write(&dir.join("b_alpha.png"), buf.get_ref());
    let cmyk =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cmyk-16x12.jpg"))
            .unwrap();
    write(&dir.join("c_cmyk.jpg"), &cmyk);

    let set = load(tmp.path(), Split::Train, &opts()).unwrap();
    assert_eq!(set.len(), 3);
    assert_eq!((set.width, set.height), (16, 12));
    let g = set.image(0);
    assert!(
        g.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]),
        "grey stays grey in RGB"
    );
    assert!(g[3 * 15] > g[0] + 100, "grey ramp kept");
    assert_eq!(&set.image(1)[..3], &[10, 200, 30]);
    // CMYK: left half red (C=0, M=Y=255), right half cyan (C=255).
    let c = set.image(2);
    let px = |x: usize, y: usize| &c[(y * 16 + x) * 3..(y * 16 + x) * 3 + 3];
    let (l, r) = (px(2, 6), px(13, 6));
    assert!(
        l[0] > 200 && l[1] < 60 && l[2] < 60,
        "left {l:?} should be red"
    );
    assert!(
        r[0] < 60 && r[1] > 200 && r[2] > 200,
        "right {r:?} should be cyan"
    );
}

#[test]
fn resize_shorter_side_then_centre_crop() {
    // 40x20 with a bright vertical stripe at the centre: after resize to 10 (short side) the crop
    // keeps the centre, so the stripe sits in the middle of the 10x10 output.
    let img = image::RgbImage::from_fn(40, 20, |x, _| {
        if (18..22).contains(&x) {
            image::Rgb([255; 3])
        } else {
            image::Rgb([0; 3])
        }
    });
    let out = resize_center_crop(img, 10);
    assert_eq!(out.dimensions(), (10, 10));
    let row: Vec<u8> = (0..10).map(|x| out.get_pixel(x, 5)[0]).collect();
    assert!(row[4] > 100 && row[5] > 100, "{row:?}");
    assert!(row[0] < 10 && row[9] < 10, "{row:?}");

    let tmp = tempfile::tempdir().unwrap();
    write(
        &tmp.path().join("train/a/x.png"),
        &png_bytes(&pattern(30, 50, 1)),
    );
    write(
        &tmp.path().join("train/b/y.png"),
        &png_bytes(&pattern(70, 20, 2)),
    );
    let sized = FolderOptions {
        image_size: Some(16),
        ..opts()
    };
    let set = load(tmp.path(), Split::Train, &sized).unwrap();
    assert_eq!((set.height, set.width, set.len()), (16, 16, 2));
    // Without a size, differing sizes are an error naming the odd file.
    let err = load(tmp.path(), Split::Train, &opts())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("y.png") && err.contains("70x20") && err.contains("30x50"),
        "{err}"
    );
}

#[test]
fn corrupt_image_is_named_or_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let files = small_tree(tmp.path());
    // Truncate a JPEG and put garbage in a .jpg.
    let jpeg = &files
        .iter()
        .find(|(n, _)| n == "train/cat/001.JPEG")
        .unwrap()
        .1;
    write(
        &tmp.path().join("train/cat/001.JPEG"),
        &jpeg[..jpeg.len() / 3],
    );
    write(
        &tmp.path().join("train/dog/zz.jpg"),
        b"definitely not a jpeg",
    );
    let e = load(tmp.path(), Split::Train, &opts()).unwrap_err();
    assert!(matches!(e, DataError::CorruptImage { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("train/cat/001.JPEG") && msg.contains("`skip_corrupt`"),
        "{msg}"
    );

    let skip = FolderOptions {
        skip_corrupt: true,
        ..opts()
    };
    let set = load(tmp.path(), Split::Train, &skip).unwrap();
    assert_eq!(set.len(), 4);
    assert_eq!(set.labels, vec![0, 0, 1, 1]);
    assert_eq!(set.skipped.len(), 2);
    assert!(set.skipped[0].path.ends_with("001.JPEG") && set.skipped[1].path.ends_with("zz.jpg"));
    // The kept images are the right ones, in order: cat/000, cat/002, dog/000, dog/001.
    assert_eq!(set.image(1), pattern(8, 8, 2).as_raw().as_slice());
    assert_eq!(set.image(2), pattern(8, 8, 10).as_raw().as_slice());

    // The same from a tar.gz archive.
    let mut files = files.clone();
    files.push(("train/dog/zz.jpg".into(), b"garbage".to_vec()));
    let archive = tmp.path().join("bad.tar.gz");
    write_tar(&archive, &files, true);
    let err = load(&archive, Split::Train, &opts())
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.tar.gz/train/dog/zz.jpg"), "{err}");
    assert_eq!(load(&archive, Split::Train, &skip).unwrap().len(), 5);
}

#[test]
fn non_image_file_empty_class_and_missing_split_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    small_tree(tmp.path());
    write(&tmp.path().join("train/cat/notes.txt"), b"hello");
    write(&tmp.path().join("train/cat/.DS_Store"), b"ignored: hidden");
    let e = load(tmp.path(), Split::Train, &opts()).unwrap_err();
    assert!(
        matches!(e, DataError::NotAnImage { .. }) && e.to_string().contains("notes.txt"),
        "{e}"
    );
    let set = load(
        tmp.path(),
        Split::Train,
        &FolderOptions {
            skip_corrupt: true,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!((set.len(), set.skipped.len()), (5, 1));
    std::fs::remove_file(tmp.path().join("train/cat/notes.txt")).unwrap();

    std::fs::create_dir_all(tmp.path().join("train/emu")).unwrap();
    let e = load(tmp.path(), Split::Train, &opts()).unwrap_err();
    assert!(
        matches!(e, DataError::EmptyClass { .. }) && e.to_string().contains("train/emu"),
        "{e}"
    );

    let empty = tempfile::tempdir().unwrap();
    let msg = load(empty.path(), Split::Test, &opts())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no test or val folder"), "{msg}");
    let msg = load(&empty.path().join("nope"), Split::Test, &opts())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope") && msg.contains("not found"), "{msg}");
    write(&empty.path().join("file.zip"), b"PK");
    let msg = load(&empty.path().join("file.zip"), Split::Test, &opts())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a .tar"), "{msg}");
    // A truncated archive is named as such.
    let files = small_tree(&empty.path().join("t"));
    let archive = empty.path().join("cut.tar.gz");
    write_tar(&archive, &files, true);
    let bytes = std::fs::read(&archive).unwrap();
    write(&archive, &bytes[..bytes.len() / 2]);
    let msg = load(&archive, Split::Train, &opts())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cut.tar.gz") && msg.contains("corrupt or truncated"),
        "{msg}"
    );
}
