//! Served completions (kept so that feedback on them can become training examples) and the
//! feedback on them.

use plugin::TrainingExample;
use rusqlite::{params, OptionalExtension};

use super::{Db, DbResult};
use crate::training::job::Job;

/// A completion the server gave, kept so that feedback on it can become a training example.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCompletion {
    pub id: String,
    /// The adapter that answered; `None`: the base model.
    pub adapter: Option<String>,
    /// The prompt as the model saw it (chat template applied).
    pub prompt: String,
    pub completion: String,
}

/// A stored feedback item.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackItem {
    pub id: String,
    pub created_at: u64,
    pub completion_id: String,
    pub adapter: String,
    pub reward: f32,
    pub corrected_answer: Option<String>,
    /// The job that trained on it, once one did.
    pub job_id: Option<String>,
}

/// A feedback item not yet used by a job.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingFeedback {
    pub id: String,
    pub prompt: String,
    pub completion: String,
    pub reward: f32,
    pub corrected_answer: Option<String>,
}

impl Db {
    /// Remembers a completion, forgetting the oldest beyond `keep`.
    pub fn insert_completion(
        &self,
        completion: &StoredCompletion,
        now: u64,
        keep: usize,
    ) -> DbResult<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR REPLACE INTO completions (id, created_at, adapter, prompt, completion)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                completion.id,
                now,
                completion.adapter,
                completion.prompt,
                completion.completion
            ],
        )?;
        conn.execute(
            "DELETE FROM completions WHERE rowid NOT IN
               (SELECT rowid FROM completions ORDER BY rowid DESC LIMIT ?1)",
            params![keep],
        )?;
        Ok(())
    }

    pub fn completion(&self, id: &str) -> DbResult<Option<StoredCompletion>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT id, adapter, prompt, completion FROM completions WHERE id = ?1",
                params![id],
                |r| {
                    Ok(StoredCompletion {
                        id: r.get(0)?,
                        adapter: r.get(1)?,
                        prompt: r.get(2)?,
                        completion: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Stores a feedback item; returns how many items of `adapter` no job has used yet, or
    /// `None` (and stores nothing) when the adapter already stores `max_stored` examples
    /// (0: no cap).
    #[allow(clippy::too_many_arguments)] // one item's columns, and the cap it must fit
    pub fn insert_feedback(
        &self,
        id: &str,
        now: u64,
        completion_id: &str,
        adapter: &str,
        reward: f32,
        corrected_answer: Option<&str>,
        max_stored: usize,
    ) -> DbResult<Option<u64>> {
        // The connection's lock is held from the count to the insert.
        let conn = self.conn();
        if max_stored > 0 && super::jobs::stored_examples(&conn, adapter)? >= max_stored {
            return Ok(None);
        }
        conn.execute(
            "INSERT INTO feedback (id, created_at, completion_id, adapter, reward, corrected_answer)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, now, completion_id, adapter, reward, corrected_answer],
        )?;
        Ok(Some(conn.query_row(
            "SELECT COUNT(*) FROM feedback WHERE adapter = ?1 AND job_id IS NULL",
            params![adapter],
            |r| r.get(0),
        )?))
    }

    /// Feedback on `adapter`, oldest first, at most `limit`.
    pub fn list_feedback(&self, adapter: &str, limit: usize) -> DbResult<Vec<FeedbackItem>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, created_at, completion_id, adapter, reward, corrected_answer, job_id
             FROM feedback WHERE adapter = ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![adapter, limit], |r| {
            Ok(FeedbackItem {
                id: r.get(0)?,
                created_at: r.get(1)?,
                completion_id: r.get(2)?,
                adapter: r.get(3)?,
                reward: r.get::<_, f64>(4)? as f32,
                corrected_answer: r.get(5)?,
                job_id: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Feedback on `adapter` that no job has used, oldest first, with its completion.
    pub fn pending_feedback(&self, adapter: &str) -> DbResult<Vec<PendingFeedback>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT f.id, c.prompt, c.completion, f.reward, f.corrected_answer
             FROM feedback f JOIN completions c ON c.id = f.completion_id
             WHERE f.adapter = ?1 AND f.job_id IS NULL ORDER BY f.seq",
        )?;
        let rows = stmt.query_map(params![adapter], |r| {
            Ok(PendingFeedback {
                id: r.get(0)?,
                prompt: r.get(1)?,
                completion: r.get(2)?,
                reward: r.get::<_, f64>(3)? as f32,
                corrected_answer: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a job made of feedback items and marks them used, in one transaction.
    pub fn insert_feedback_job(
        &self,
        job: &Job,
        train: &[TrainingExample],
        feedback_ids: &[String],
    ) -> DbResult<()> {
        self.insert_job(job, train, &[])?;
        let conn = self.conn();
        let mut stmt = conn.prepare("UPDATE feedback SET job_id = ?1 WHERE id = ?2")?;
        for id in feedback_ids {
            stmt.execute(params![job.id, id])?;
        }
        Ok(())
    }
}
