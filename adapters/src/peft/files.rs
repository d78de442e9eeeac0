//! Reading and writing an adapter folder's files: reads bounded in size, writes atomic (a
//! temporary file fsynced, renamed into place, the folder fsynced).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use super::invalid;
use crate::{AdapterError, Result};

/// Reads a whole file, refusing it if it is larger than `max_bytes`.
pub(super) fn read_limited(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let io = |source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    };
    let too_large = |size: u64| {
        invalid(
            path,
            format!(
                "the file is {size} bytes, over the {max_bytes}-byte limit for adapters; use a \
                 smaller adapter (lower r or fewer target modules) or raise the limit"
            ),
        )
    };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > max_bytes {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // The file may grow between the size check and the read; never read past the limit.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Replaces `dir/name` with `bytes` so that a crash or a concurrent reader never sees a partial
/// file: write a temporary file beside it, flush it to disk, rename it over the old one, and
/// flush the directory so that the rename itself survives a crash.
pub(super) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let final_path = dir.join(name);
    // Dropping it on an error path deletes it.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|source| AdapterError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    let written = tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all());
    if let Err(source) = written {
        return Err(AdapterError::Io {
            path: tmp.path().to_path_buf(),
            source,
        });
    }
    tmp.persist(&final_path).map_err(|e| AdapterError::Io {
        path: final_path,
        source: e.error,
    })?;
    sync_dir(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    let io = |source| AdapterError::Io {
        path: dir.to_path_buf(),
        source,
    };
    File::open(dir).map_err(io)?.sync_all().map_err(io)
}

/// Other systems cannot open a directory to flush it; the rename is as durable as they allow.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}
