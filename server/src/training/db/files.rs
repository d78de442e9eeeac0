//! Uploaded files (OpenAI's `/v1/files`): metadata and content.

use rusqlite::{params, OptionalExtension};

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
        self.conn().execute(
            "INSERT INTO files (id, created_at, filename, purpose, bytes, content)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                file.id,
                file.created_at,
                file.filename,
                file.purpose,
                file.bytes,
                content
            ],
        )?;
        Ok(())
    }

    pub fn file(&self, id: &str) -> DbResult<Option<StoredFile>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT id, created_at, filename, purpose, bytes FROM files WHERE id = ?1",
                params![id],
                file_row,
            )
            .optional()?)
    }

    pub fn file_content(&self, id: &str) -> DbResult<Option<Vec<u8>>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT content FROM files WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn list_files(&self) -> DbResult<Vec<StoredFile>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, created_at, filename, purpose, bytes FROM files ORDER BY created_at DESC, id",
        )?;
        let rows = stmt.query_map([], file_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_file(&self, id: &str) -> DbResult<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM files WHERE id = ?1", params![id])?
            == 1)
    }
}

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredFile> {
    Ok(StoredFile {
        id: r.get(0)?,
        created_at: r.get(1)?,
        filename: r.get(2)?,
        purpose: r.get(3)?,
        bytes: r.get(4)?,
    })
}
