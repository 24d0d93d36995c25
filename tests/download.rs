//! `atop data download` against a local HTTP server on 127.0.0.1 serving an archive the test
//! builds: a good download is verified and usable, a corrupted or cut one is rejected and leaves
//! nothing behind.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;

use atop::data::download::{Archive, download, md5_file};
use common::*;

/// Serves `body` (with `content_length` in the header) to at most `max` requests, then stops.
/// Paths other than `/file.tar.gz` get a 404.
fn serve(body: Vec<u8>, content_length: usize, max: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
            }
            if request.starts_with("GET /file.tar.gz ") {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {content_length}\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            } else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        }
    });
    format!("http://{addr}")
}

/// A small CIFAR-10 binary archive (2 test records + meta), as the official one is laid out.
fn small_cifar_archive(dir: &Path) -> Vec<u8> {
    let mut test = Vec::new();
    test.extend(cifar_record(&[3], &pattern(32, 32, 1)));
    test.extend(cifar_record(&[8], &pattern(32, 32, 2)));
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    let path = dir.join("src.tar.gz");
    write_tar(
        &path,
        &[
            ("cifar-10-batches-bin/test_batch.bin".into(), test),
            (
                "cifar-10-batches-bin/batches.meta.txt".into(),
                names.as_bytes().to_vec(),
            ),
        ],
        true,
    );
    std::fs::read(path).unwrap()
}

fn md5_of(bytes: &[u8], dir: &Path) -> String {
    let p = dir.join("md5-probe");
    std::fs::write(&p, bytes).unwrap();
    md5_file(&p).unwrap().1
}

#[test]
fn good_download_is_verified_moved_into_place_and_loadable() {
    let tmp = tempfile::tempdir().unwrap();
    let body = small_cifar_archive(tmp.path());
    let md5 = md5_of(&body, tmp.path());
    let base = serve(body.clone(), body.len(), 1);
    let dest = tmp.path().join("data");
    let archive = Archive {
        url: format!("{base}/file.tar.gz"),
        file_name: "file.tar.gz".into(),
        md5: md5.clone(),
    };
    let done = download(&archive, &dest).unwrap();
    assert!(!done.already_present);
    assert_eq!(done.bytes, body.len() as u64);
    assert_eq!(std::fs::read(dest.join("file.tar.gz")).unwrap(), body);
    assert!(!dest.join("file.tar.gz.part").exists());
    // A second call finds it and fetches nothing (the server would refuse: it served once).
    assert!(download(&archive, &dest).unwrap().already_present);

    // The downloaded archive is read directly by the CIFAR-10 loader.
    let set = atop::data::cifar::load(
        &dest.join("file.tar.gz"),
        atop::data::cifar::CifarFormat::Cifar10,
        atop::data::Split::Test,
    )
    .unwrap()
    .unwrap();
    assert_eq!(set.labels, vec![3, 8]);
}

#[test]
fn corrupted_download_is_rejected_and_not_left_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let body = small_cifar_archive(tmp.path());
    let md5 = md5_of(&body, tmp.path());
    let mut corrupted = body.clone();
    corrupted[body.len() / 2] ^= 0xff;
    let base = serve(corrupted, body.len(), 1);
    let dest = tmp.path().join("data");
    let archive = Archive {
        url: format!("{base}/file.tar.gz"),
        file_name: "file.tar.gz".into(),
        md5: md5.clone(),
    };
    let err = download(&archive, &dest).unwrap_err().to_string();
    assert!(
        err.contains("expected") && err.contains(&md5) && err.contains("deleted"),
        "{err}"
    );
    assert!(!dest.join("file.tar.gz").exists());
    assert!(!dest.join("file.tar.gz.part").exists());
}

#[test]
fn cut_connection_and_missing_file_are_errors_leaving_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let body = small_cifar_archive(tmp.path());
    let md5 = md5_of(&body, tmp.path());
    // The server promises more bytes than it sends.
    let base = serve(body[..body.len() - 10].to_vec(), body.len(), 2);
    let dest = tmp.path().join("data");
    let mut archive = Archive {
        url: format!("{base}/file.tar.gz"),
        file_name: "file.tar.gz".into(),
        md5,
    };
    let err = format!("{:#}", download(&archive, &dest).unwrap_err());
    assert!(err.contains("file.tar.gz"), "{err}");
    assert!(
        std::fs::read_dir(&dest).unwrap().next().is_none(),
        "nothing left in {}",
        dest.display()
    );

    archive.url = format!("{base}/missing.tar.gz");
    let err = format!("{:#}", download(&archive, &dest).unwrap_err());
    assert!(
        err.contains("404") && err.contains("missing.tar.gz"),
        "{err}"
    );
    assert!(std::fs::read_dir(&dest).unwrap().next().is_none());
}

#[test]
fn cli_download_then_inspect_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let body = small_cifar_archive(tmp.path());
    let md5 = md5_of(&body, tmp.path());
    let base = serve(body.clone(), body.len(), 1);
    let dest = tmp.path().join("data");
    let json = run_json(
        atop()
            .args(["--json", "data", "download", "cifar10", "--root"])
            .arg(&dest)
            .args(["--url", &format!("{base}/file.tar.gz"), "--md5", &md5]),
    );
    assert_eq!(json["md5"], md5.as_str());
    assert_eq!(json["already_present"], false);

    let json = run_json(
        atop()
            .args([
                "--json",
                "data",
                "inspect",
                "--dataset",
                "cifar10",
                "--split",
                "test",
                "--root",
            ])
            .arg(dest.join("file.tar.gz"))
            .arg("--grid")
            .arg(tmp.path().join("grid.png")),
    );
    assert_eq!(json["images"], 2);
    assert_eq!(json["classes"][3]["count"], 1);
    assert!(tmp.path().join("grid.png").is_file());
}

#[test]
fn official_sources_have_md5s() {
    use atop::data::DatasetKind;
    use atop::data::download::{ImagenetteVariant, official};
    let c10 = official(DatasetKind::Cifar10, ImagenetteVariant::Full).unwrap();
    assert_eq!(c10.file_name, "cifar-10-binary.tar.gz");
    assert_eq!(c10.md5, "c32a1d4ab5d03f1284b67883e8d87530");
    let nette = official(DatasetKind::Imagenette, ImagenetteVariant::Px160).unwrap();
    assert_eq!(nette.file_name, "imagenette2-160.tgz");
    assert!(official(DatasetKind::Folder, ImagenetteVariant::Full).is_err());
}
