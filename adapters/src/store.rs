//! Where adapter versions live on disk: one folder per adapter name in the adapters root, one
//! PEFT folder per version inside it.
//!
//! ```text
//! <adapters root>/
//!   sentiment/v1/{adapter_config.json, adapter_model.safetensors}
//!   sentiment/v2/…
//!   support-bot/{adapter_config.json, adapter_model.safetensors}   ← a plain PEFT folder: version 1
//! ```
//!
//! A plain PEFT folder dropped into the root (as saved by `peft`'s `save_pretrained`) is served
//! as version 1 of the folder's name, so adapters trained elsewhere need no conversion.

use std::path::{Path, PathBuf};

use crate::{AdapterError, Result};

/// The file that marks a folder as a PEFT adapter.
const CONFIG_FILE: &str = "adapter_config.json";

/// One adapter version found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub name: String,
    pub version: u32,
    pub dir: PathBuf,
}

/// Checks that `name` can be an adapter name: it is a model id in requests (where `@` selects a
/// version) and a folder name on disk.
///
/// # Errors
///
/// [`AdapterError::InvalidConfig`] saying which characters are allowed.
pub fn validate_name(name: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if name.is_empty() || name.len() > 96 || name.starts_with('.') || !name.chars().all(allowed) {
        return Err(AdapterError::InvalidConfig(format!(
            "`{name}` is not a valid adapter name; use 1 to 96 letters, digits, '-', '_', '.' or ':', not starting with '.'"
        )));
    }
    Ok(())
}

/// The folder of `version` of `name` under `root`.
pub fn version_dir(root: &Path, name: &str, version: u32) -> PathBuf {
    root.join(name).join(format!("v{version}"))
}

/// Lists every adapter version under `root`, sorted by name then version. A missing root is an
/// empty store. Folders that are neither a PEFT folder nor hold `v<N>` PEFT folders are skipped
/// with their reason in the returned warnings, so one stray folder does not stop a server.
///
/// # Errors
///
/// [`AdapterError::Io`] if `root` exists but cannot be read.
pub fn scan(root: &Path) -> Result<(Vec<StoredVersion>, Vec<String>)> {
    let mut found = Vec::new();
    let mut warnings = Vec::new();
    if !root.exists() {
        return Ok((found, warnings));
    }
    for entry in read_dir_sorted(root)? {
        let Some(name) = entry
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if !entry.is_dir() || name.starts_with('.') {
            continue;
        }
        if let Err(err) = validate_name(&name) {
            warnings.push(format!("skipping {}: {err}", entry.display()));
            continue;
        }
        if entry.join(CONFIG_FILE).is_file() {
            found.push(StoredVersion {
                name,
                version: 1,
                dir: entry,
            });
            continue;
        }
        let mut versions: Vec<StoredVersion> = read_dir_sorted(&entry)?
            .into_iter()
            .filter(|dir| dir.join(CONFIG_FILE).is_file())
            .filter_map(|dir| {
                let version = dir
                    .file_name()?
                    .to_str()?
                    .strip_prefix('v')?
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| v > 0)?;
                Some(StoredVersion {
                    name: name.clone(),
                    version,
                    dir,
                })
            })
            .collect();
        if versions.is_empty() {
            warnings.push(format!(
                "skipping {}: it holds neither {CONFIG_FILE} nor v1, v2, … version folders",
                entry.display()
            ));
        }
        versions.sort_by_key(|v| v.version);
        found.extend(versions);
    }
    Ok((found, warnings))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| AdapterError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io)?;
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peft_dir(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
    }

    #[test]
    fn finds_versioned_and_plain_folders_and_skips_strays() {
        let root = tempfile::tempdir().unwrap();
        peft_dir(&version_dir(root.path(), "sentiment", 2));
        peft_dir(&version_dir(root.path(), "sentiment", 10));
        peft_dir(&root.path().join("plain"));
        std::fs::create_dir_all(root.path().join("empty")).unwrap();
        peft_dir(&root.path().join("bad name"));
        let (found, warnings) = scan(root.path()).unwrap();
        let got: Vec<(&str, u32)> = found.iter().map(|v| (v.name.as_str(), v.version)).collect();
        assert_eq!(got, vec![("plain", 1), ("sentiment", 2), ("sentiment", 10)]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("empty")));
        assert!(warnings.iter().any(|w| w.contains("bad name")));
    }

    #[test]
    fn a_missing_root_is_an_empty_store() {
        let (found, warnings) = scan(Path::new("/nonexistent/adapters")).unwrap();
        assert!(found.is_empty() && warnings.is_empty());
    }

    #[test]
    fn names_are_checked() {
        for good in ["sentiment", "ft:smollm2:local:x:ftjob-1", "a.b-c_d"] {
            validate_name(good).unwrap();
        }
        for bad in ["", ".hidden", "a@1", "a/b", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
