//! Where dataset files come from: a folder on disk, or a `.tar` / `.tar.gz` archive read directly
//! (no extraction step, so the shared read-only archives work as they are).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::error::{DataError, Result};

#[derive(Debug, Clone)]
pub enum Source {
    Dir(PathBuf),
    Tar { path: PathBuf, gzip: bool },
}

/// One regular file read from an archive; `rel` is '/'-separated with any leading "./" removed.
pub struct ArchiveFile {
    pub rel: String,
    pub bytes: Vec<u8>,
}

pub struct ArchiveListing {
    pub files: Vec<ArchiveFile>,
    /// Every directory named in the archive, explicitly or as a parent of a file.
    pub dirs: Vec<String>,
}

impl Source {
    pub fn open(path: &Path) -> Result<Source> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::NotFound {
                path: path.to_path_buf(),
                what: "expected a dataset folder or a .tar/.tar.gz archive".into(),
            },
            _ => DataError::io(path, e),
        })?;
        if meta.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let gzip = if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            true
        } else if name.ends_with(".tar") {
            false
        } else {
            return Err(DataError::Archive {
                path: path.to_path_buf(),
                what: "is a file but not a .tar, .tar.gz or .tgz archive".into(),
            });
        };
        Ok(Source::Tar {
            path: path.to_path_buf(),
            gzip,
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Source::Dir(p) => p,
            Source::Tar { path, .. } => path,
        }
    }

    /// The first regular file in an archive (stops reading there): a cheap way to tell formats apart.
    pub fn first_archive_file(&self) -> Result<Option<String>> {
        let Source::Tar { path, .. } = self else {
            return Ok(None);
        };
        let mut archive = tar::Archive::new(self.archive_reader()?);
        let bad = |e: std::io::Error| DataError::Archive {
            path: path.clone(),
            what: format!("corrupt or truncated archive: {e}"),
        };
        for entry in archive.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            if entry.header().entry_type().is_file() {
                let rel = entry.path().map_err(bad)?.to_string_lossy().into_owned();
                return Ok(Some(normalise(&rel)));
            }
        }
        Ok(None)
    }

    fn archive_reader(&self) -> Result<Box<dyn Read>> {
        let Source::Tar { path, gzip } = self else {
            unreachable!("archive_reader is only called on archives")
        };
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(if *gzip {
            Box::new(flate2::read::GzDecoder::new(BufReader::with_capacity(
                1 << 20,
                file,
            )))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, file))
        })
    }

    /// Streams through an archive once, keeping the bytes of the regular files `want` accepts.
    pub fn scan_archive(&self, mut want: impl FnMut(&str) -> bool) -> Result<ArchiveListing> {
        let Source::Tar { path, .. } = self else {
            unreachable!("scan_archive is only called on archives")
        };
        let reader = self.archive_reader()?;
        let bad = |what: String| DataError::Archive {
            path: path.clone(),
            what,
        };
        let mut archive = tar::Archive::new(reader);
        let mut files = Vec::new();
        let mut dirs = std::collections::BTreeSet::new();
        let entries = archive
            .entries()
            .map_err(|e| bad(format!("cannot read archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("corrupt or truncated archive: {e}")))?;
            let raw = entry
                .path()
                .map_err(|e| bad(format!("bad entry name: {e}")))?
                .to_string_lossy()
                .into_owned();
            let rel = normalise(&raw);
            if rel.is_empty() {
                continue;
            }
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                dirs.insert(rel.trim_end_matches('/').to_string());
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            if let Some((parent, _)) = rel.rsplit_once('/') {
                dirs.insert(parent.to_string());
            }
            if want(&rel) {
                let mut bytes = Vec::with_capacity(entry.size() as usize);
                entry
                    .read_to_end(&mut bytes)
                    .map_err(|e| bad(format!("{rel}: corrupt or truncated archive: {e}")))?;
                files.push(ArchiveFile { rel, bytes });
            }
        }
        Ok(ArchiveListing {
            files,
            dirs: dirs.into_iter().collect(),
        })
    }
}

fn normalise(raw: &str) -> String {
    let mut s = raw.replace('\\', "/");
    while let Some(rest) = s.strip_prefix("./") {
        s = rest.to_string();
    }
    s.trim_start_matches('/').to_string()
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Sorted names of the sub-folders of `dir`.
pub fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if entry
            .file_type()
            .map_err(|e| DataError::io(entry.path(), e))?
            .is_dir()
        {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}
