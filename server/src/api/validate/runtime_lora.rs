//! `POST /v1/load_lora_adapter` (vLLM's, which RL frameworks call after each round of training
//! elsewhere): the request as sent ([`LoadLoraRequest`]) becomes a [`ValidLoraLoad`]: a valid
//! adapter name, and a folder that really lies under the configured `server.lora_load_root`
//! (resolved, so `..` and symbolic links cannot lead out of it).

use std::path::{Path, PathBuf};

use crate::api::error::ApiError;
use crate::api::protocol::LoadLoraRequest;

/// An adapter folder to load, checked.
pub struct ValidLoraLoad {
    pub name: String,
    /// The folder, resolved.
    pub dir: PathBuf,
    /// Whether an adapter already served under `name` may get it as its next version.
    pub in_place: bool,
}

impl ValidLoraLoad {
    pub fn new(request: LoadLoraRequest, root: Option<&Path>) -> Result<Self, ApiError> {
        let Some(root) = root else {
            return Err(ApiError::forbidden(
                "lora_path",
                "loading adapters at runtime is off on this server; set `lora_load_root` in the \
                 config's [server] section to the folder adapters may be loaded from",
            ));
        };
        adapters::store::validate_name(&request.lora_name)
            .map_err(|e| ApiError::invalid("lora_name", e.to_string()))?;
        let outside = || {
            ApiError::forbidden(
                "lora_path",
                format!(
                    "`lora_path` {:?} is not under {}, the folder this server loads adapters from \
                     (server.lora_load_root)",
                    request.lora_path,
                    root.display()
                ),
            )
        };
        let given = Path::new(&request.lora_path);
        if !given.is_absolute() {
            return Err(outside());
        }
        let root = root.canonicalize().map_err(|e| {
            ApiError::internal(format!(
                "the adapter folder root {} cannot be read: {e}",
                root.display()
            ))
        })?;
        let dir = given.canonicalize().map_err(|e| {
            ApiError::invalid(
                "lora_path",
                format!("`lora_path` {:?} cannot be read: {e}", request.lora_path),
            )
        })?;
        if !dir.starts_with(&root) {
            return Err(outside());
        }
        if !dir.is_dir() {
            return Err(ApiError::invalid(
                "lora_path",
                format!(
                    "`lora_path` {:?} is not a folder; give a PEFT adapter folder \
                     (adapter_config.json + adapter_model.safetensors)",
                    request.lora_path
                ),
            ));
        }
        Ok(Self {
            name: request.lora_name,
            dir,
            in_place: request.load_inplace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, path: &Path) -> LoadLoraRequest {
        LoadLoraRequest {
            lora_name: name.into(),
            lora_path: path.display().to_string(),
            load_inplace: false,
        }
    }

    #[test]
    fn only_folders_under_the_root_load() {
        let root = tempfile::tempdir().expect("tempdir");
        let inside = root.path().join("round-3");
        std::fs::create_dir(&inside).expect("mkdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let valid = ValidLoraLoad::new(load("policy", &inside), Some(root.path())).expect("inside");
        assert_eq!(valid.name, "policy");
        assert_eq!(valid.dir, inside.canonicalize().expect("canonical"));

        for (request, status, param) in [
            (load("policy", outside.path()), 403, "lora_path"),
            (load("policy", &inside.join("../..")), 403, "lora_path"),
            (load("policy", Path::new("round-3")), 403, "lora_path"),
            (
                load("policy", &root.path().join("missing")),
                400,
                "lora_path",
            ),
            (load("no spaces", &inside), 400, "lora_name"),
        ] {
            let err = ValidLoraLoad::new(request, Some(root.path()))
                .err()
                .expect("refused");
            assert_eq!(err.status.as_u16(), status, "{}", err.message);
            assert_eq!(err.param.as_deref(), Some(param), "{}", err.message);
        }
        let err = ValidLoraLoad::new(load("policy", &inside), None)
            .err()
            .expect("off");
        assert_eq!(err.status.as_u16(), 403);
        assert!(err.message.contains("lora_load_root"), "{}", err.message);
    }
}
