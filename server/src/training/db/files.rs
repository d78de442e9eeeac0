//! Uploaded files (OpenAI's `/v1/files`): metadata and content.

use super::sql::{values, Row};
use super::{Db, DbResult};

/// An uploaded file's metadata (`content` is read separately).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFile {
    pub id: String,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
}

impl Db {
    pub fn insert_file(&self, file: &StoredFile, content: &[u8]) -> DbResult<()> {
        self.transaction(|conn| {
            conn.execute(
                "INSERT INTO files (id, created_at, filename, purpose, bytes, content)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &values![
                    &file.id,
                    file.created_at,
                    &file.filename,
                    &file.purpose,
                    file.bytes,
                    content
                ],
            )
        })?;
        Ok(())
    }

    pub fn file(&self, id: &str) -> DbResult<Option<StoredFile>> {
        let row = self.transaction(|conn| {
            conn.query_opt(
                "SELECT id, created_at, filename, purpose, bytes FROM files WHERE id = ?1",
                &values![id],
            )
        })?;
        row.as_ref().map(file_from_row).transpose()
    }

    pub fn file_content(&self, id: &str) -> DbResult<Option<Vec<u8>>> {
        let row = self.transaction(|conn| {
            conn.query_opt("SELECT content FROM files WHERE id = ?1", &values![id])
        })?;
        row.map(|row| row.get(0)).transpose()
    }

    pub fn list_files(&self) -> DbResult<Vec<StoredFile>> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT id, created_at, filename, purpose, bytes FROM files ORDER BY created_at DESC, id",
                &[],
            )
        })?;
        rows.iter().map(file_from_row).collect()
    }

    pub fn delete_file(&self, id: &str) -> DbResult<bool> {
        let deleted =
            self.transaction(|conn| conn.execute("DELETE FROM files WHERE id = ?1", &values![id]))?;
        Ok(deleted == 1)
    }
}

fn file_from_row(row: &Row) -> DbResult<StoredFile> {
    Ok(StoredFile {
        id: row.get(0)?,
        created_at: row.get(1)?,
        filename: row.get(2)?,
        purpose: row.get(3)?,
        bytes: row.get(4)?,
    })
}
