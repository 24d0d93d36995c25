//! `atop data download`: fetch an official archive over HTTP(S), verify its published MD5, and
//! only then move it into place. A failed or corrupted download leaves nothing behind.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use md5::{Digest, Md5};
use serde::Serialize;

use super::DatasetKind;
use crate::progress;

/// An archive to fetch and the checksum it must have.
#[derive(Debug, Clone, Serialize)]
pub struct Archive {
    pub url: String,
    pub file_name: String,
    pub md5: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum ImagenetteVariant {
    /// Full-size images (1.5 GB).
    Full,
    /// Shorter side 320 px (326 MB).
    #[default]
    #[cfg_attr(feature = "cli", value(name = "320"))]
    Px320,
    /// Shorter side 160 px (94 MB).
    #[cfg_attr(feature = "cli", value(name = "160"))]
    Px160,
}

/// The dataset authors' archives and their published MD5 sums.
pub fn official(dataset: DatasetKind, variant: ImagenetteVariant) -> Result<Archive> {
    let (url, md5) = match dataset {
        DatasetKind::Cifar10 => (
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
        ),
        DatasetKind::Cifar100 => (
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
            "03b5dce01913d631647c71ecec9e9cb8",
        ),
        DatasetKind::Imagenette => match variant {
            ImagenetteVariant::Full => (
                "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
                "fe2fc210e6bb7c5664d602c3cd71e612",
            ),
            ImagenetteVariant::Px320 => (
                "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
                "3df6f0d01a2c9592104656642f5e78a3",
            ),
            ImagenetteVariant::Px160 => (
                "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                "e793b78cc4c9e9a4ccc0c1155377a412",
            ),
        },
        DatasetKind::Folder => {
            bail!("'folder' datasets have no official archive; pass `url` and `md5`")
        }
    };
    Ok(Archive {
        url: url.into(),
        file_name: file_name_of(url)?,
        md5: md5.into(),
    })
}

pub fn file_name_of(url: &str) -> Result<String> {
    let name = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .rsplit('/')
        .next()
        .unwrap_or("");
    if name.is_empty() {
        bail!("cannot tell a file name from the URL '{url}'");
    }
    Ok(name.to_string())
}

#[derive(Debug, Serialize)]
pub struct Downloaded {
    pub path: PathBuf,
    pub bytes: u64,
    pub md5: String,
    /// The file was already there with the right checksum; nothing was fetched.
    pub already_present: bool,
}

/// Fetches `archive` into `dir` (created if needed). The bytes go to `<name>.part`, are hashed on
/// the way, and the file is renamed into place only if the MD5 matches.
pub fn download(archive: &Archive, dir: &Path) -> Result<Downloaded> {
    let want = archive.md5.to_ascii_lowercase();
    if want.len() != 32 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("checksum '{}' is not an MD5 (32 hex digits)", archive.md5);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dest = dir.join(&archive.file_name);
    if dest.is_file() {
        let (bytes, md5) = md5_file(&dest)?;
        if md5 == want {
            return Ok(Downloaded {
                path: dest,
                bytes,
                md5,
                already_present: true,
            });
        }
        tracing::warn!(
            "{} exists with MD5 {md5}, expected {want}: downloading again",
            dest.display()
        );
    }

    let part = dir.join(format!("{}.part", archive.file_name));
    let result = fetch_to(&archive.url, &part);
    let (bytes, md5) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    if md5 != want {
        let _ = std::fs::remove_file(&part);
        bail!(
            "{}: downloaded {bytes} bytes with MD5 {md5}, expected {want}; the download is corrupt or not the official file, and was deleted",
            archive.url
        );
    }
    std::fs::rename(&part, &dest)
        .with_context(|| format!("cannot move {} to {}", part.display(), dest.display()))?;
    Ok(Downloaded {
        path: dest,
        bytes,
        md5,
        already_present: false,
    })
}

fn fetch_to(url: &str, part: &Path) -> Result<(u64, String)> {
    let response = ureq::get(url)
        .call()
        .with_context(|| format!("GET {url} failed"))?;
    let total: Option<u64> = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut reader = response.into_body().into_reader();
    let file = File::create(part).with_context(|| format!("cannot create {}", part.display()))?;
    let mut out = BufWriter::new(file);
    let bar = progress::bytes_bar(
        total.unwrap_or(0),
        &format!("downloading {}", file_name_of(url)?),
    );
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("reading {url} failed after {bytes} bytes"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", part.display()))?;
        bytes += n as u64;
        bar.set_position(bytes);
    }
    bar.finish_and_clear();
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", part.display()))?;
    if let Some(total) = total.filter(|t| *t != bytes) {
        bail!("{url}: connection closed after {bytes} of {total} bytes");
    }
    Ok((bytes, crate::io::hex(&hasher.finalize())))
}

/// Size and MD5 of a file on disk.
pub fn md5_file(path: &Path) -> Result<(u64, String)> {
    let (bytes, digest) = crate::io::digest_file::<Md5>(path)?;
    Ok((bytes, crate::io::hex(&digest)))
}
