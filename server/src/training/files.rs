//! OpenAI's uploaded files (`/v1/files`), kept in the fine-tuning database: what the HTTP layer
//! may do with them. A missing file is [`TrainingError::NotFound`].

use super::{StoredFile, Training, TrainingError};

impl Training {
    /// Stores an uploaded file (already checked by the HTTP layer).
    pub fn store_file(&self, file: &StoredFile, content: &[u8]) -> Result<(), TrainingError> {
        Ok(self.shared.db.insert_file(file, content)?)
    }

    /// Every stored file, newest first.
    pub fn files(&self) -> Result<Vec<StoredFile>, TrainingError> {
        Ok(self.shared.db.list_files()?)
    }

    pub fn file(&self, id: &str) -> Result<StoredFile, TrainingError> {
        self.shared.db.file(id)?.ok_or_else(|| not_found(id))
    }

    pub fn file_content(&self, id: &str) -> Result<Vec<u8>, TrainingError> {
        self.shared
            .db
            .file_content(id)?
            .ok_or_else(|| not_found(id))
    }

    pub fn delete_file(&self, id: &str) -> Result<(), TrainingError> {
        if self.shared.db.delete_file(id)? {
            Ok(())
        } else {
            Err(not_found(id))
        }
    }
}

fn not_found(id: &str) -> TrainingError {
    TrainingError::NotFound {
        what: "file",
        id: id.to_string(),
    }
}
