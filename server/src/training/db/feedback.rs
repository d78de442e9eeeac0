//! Served completions (kept so that feedback on them can become training examples) and the
//! feedback on them.

use plugin::TrainingExample;

use super::sql::values;
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
        self.transaction(|conn| {
            conn.execute(
                "INSERT INTO completions (id, created_at, adapter, prompt, completion)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET created_at = excluded.created_at,
                   adapter = excluded.adapter, prompt = excluded.prompt,
                   completion = excluded.completion",
                &values![
                    &completion.id,
                    now,
                    completion.adapter.as_deref(),
                    &completion.prompt,
                    &completion.completion
                ],
            )?;
            let order = conn.dialect().completions_insertion_order();
            conn.execute(
                &format!(
                    "DELETE FROM completions WHERE {order} NOT IN
                       (SELECT {order} FROM completions ORDER BY {order} DESC LIMIT ?1)"
                ),
                &values![keep],
            )
        })?;
        Ok(())
    }

    pub fn completion(&self, id: &str) -> DbResult<Option<StoredCompletion>> {
        let row = self.transaction(|conn| {
            conn.query_opt(
                "SELECT id, adapter, prompt, completion FROM completions WHERE id = ?1",
                &values![id],
            )
        })?;
        row.map(|row| {
            Ok(StoredCompletion {
                id: row.get(0)?,
                adapter: row.get(1)?,
                prompt: row.get(2)?,
                completion: row.get(3)?,
            })
        })
        .transpose()
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
        // One transaction from the count to the insert.
        self.transaction(|conn| {
            if max_stored > 0 && super::jobs::stored_examples(conn, adapter)? >= max_stored {
                return Ok(None);
            }
            conn.execute(
                "INSERT INTO feedback (id, created_at, completion_id, adapter, reward, corrected_answer)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &values![id, now, completion_id, adapter, reward, corrected_answer],
            )?;
            conn.query_value(
                "SELECT COUNT(*) FROM feedback WHERE adapter = ?1 AND job_id IS NULL",
                &values![adapter],
            )
            .map(Some)
        })
    }

    /// Feedback on `adapter`, oldest first, at most `limit`.
    pub fn list_feedback(&self, adapter: &str, limit: usize) -> DbResult<Vec<FeedbackItem>> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT id, created_at, completion_id, adapter, reward, corrected_answer, job_id
                 FROM feedback WHERE adapter = ?1 ORDER BY seq LIMIT ?2",
                &values![adapter, limit],
            )
        })?;
        rows.iter()
            .map(|row| {
                Ok(FeedbackItem {
                    id: row.get(0)?,
                    created_at: row.get(1)?,
                    completion_id: row.get(2)?,
                    adapter: row.get(3)?,
                    reward: row.get::<f64>(4)? as f32,
                    corrected_answer: row.get(5)?,
                    job_id: row.get(6)?,
                })
            })
            .collect()
    }

    /// Feedback on `adapter` that no job has used, oldest first, with its completion.
    pub fn pending_feedback(&self, adapter: &str) -> DbResult<Vec<PendingFeedback>> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT f.id, c.prompt, c.completion, f.reward, f.corrected_answer
                 FROM feedback f JOIN completions c ON c.id = f.completion_id
                 WHERE f.adapter = ?1 AND f.job_id IS NULL ORDER BY f.seq",
                &values![adapter],
            )
        })?;
        rows.iter()
            .map(|row| {
                Ok(PendingFeedback {
                    id: row.get(0)?,
                    prompt: row.get(1)?,
                    completion: row.get(2)?,
                    reward: row.get::<f64>(3)? as f32,
                    corrected_answer: row.get(4)?,
                })
            })
            .collect()
    }

    /// Stores a job made of feedback items and marks them used, in one transaction; false
    /// (nothing stored) when another server's job took one of the items first.
    pub fn insert_feedback_job(
        &self,
        job: &Job,
        train: &[TrainingExample],
        feedback_ids: &[String],
    ) -> DbResult<bool> {
        self.transaction(|conn| {
            let mut taken = 0;
            for id in feedback_ids {
                taken += conn.execute(
                    "UPDATE feedback SET job_id = ?1 WHERE id = ?2 AND job_id IS NULL",
                    &values![&job.id, id],
                )?;
            }
            if taken < feedback_ids.len() as u64 {
                conn.execute(
                    "UPDATE feedback SET job_id = NULL WHERE job_id = ?1",
                    &values![&job.id],
                )?;
                return Ok(false);
            }
            super::jobs::insert_job_rows(conn, job, None, train, &[])?;
            Ok(true)
        })
    }
}
