//! Notices that a job has a new event, so that event streams wait for one instead of polling
//! the database. The database stays the record: a notice only says "read again".

use std::sync::Arc;

use tokio::sync::broadcast::{self, error::RecvError};

/// Notices a stream may fall behind by before it re-reads the database anyway.
const BACKLOG: usize = 256;

/// The sending side, held by the fine-tuning service.
pub struct EventNotices {
    sender: broadcast::Sender<Arc<str>>,
}

impl Default for EventNotices {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
        }
    }
}

impl EventNotices {
    /// Tells every watcher that job `job_id` has a new event.
    pub fn notify(&self, job_id: &str) {
        // An error only means that nobody is watching.
        let _ = self.sender.send(Arc::from(job_id));
    }

    /// A watch that sees every notice from now on: subscribe before reading the database, so
    /// that an event written between the read and the wait is not missed.
    pub fn watch(&self) -> EventWatch {
        EventWatch {
            receiver: self.sender.subscribe(),
        }
    }
}

/// One stream's subscription.
pub struct EventWatch {
    receiver: broadcast::Receiver<Arc<str>>,
}

impl EventWatch {
    /// Waits until job `job_id` may have a new event: one was written for it, or this watch fell
    /// behind and missed notices. False once the service has stopped.
    pub async fn changed(&mut self, job_id: &str) -> bool {
        loop {
            match self.receiver.recv().await {
                Ok(job) if &*job == job_id => return true,
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => return true,
                Err(RecvError::Closed) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SOON: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_watch_wakes_for_its_job_only() {
        let notices = EventNotices::default();
        let mut watch = notices.watch();
        notices.notify("job-b");
        assert!(tokio::time::timeout(SOON, watch.changed("job-a"))
            .await
            .is_err());
        notices.notify("job-a");
        assert!(tokio::time::timeout(SOON, watch.changed("job-a"))
            .await
            .expect("a notice for the job wakes its watch"));
    }

    #[tokio::test]
    async fn a_notice_sent_before_the_wait_is_kept() {
        let notices = EventNotices::default();
        let mut watch = notices.watch();
        notices.notify("job-a");
        assert!(tokio::time::timeout(SOON, watch.changed("job-a"))
            .await
            .expect("the notice waited in the watch"));
    }

    #[tokio::test]
    async fn a_watch_that_fell_behind_reads_again() {
        let notices = EventNotices::default();
        let mut watch = notices.watch();
        for _ in 0..BACKLOG + 1 {
            notices.notify("job-b");
        }
        assert!(tokio::time::timeout(SOON, watch.changed("job-a"))
            .await
            .expect("missed notices may have been for this job"));
    }

    #[tokio::test]
    async fn a_watch_ends_with_the_service() {
        let notices = EventNotices::default();
        let mut watch = notices.watch();
        drop(notices);
        assert!(!watch.changed("job-a").await);
    }
}
