//! The record of sent emails (`email_log`), written with group commit.
//!
//! A sent email must be recorded at once: until its row commits, a crash makes a retry
//! send it again. Concurrent sends therefore do not each pay a round trip and a commit
//! (an fsync on PostgreSQL): whoever finds no write running writes every record waiting
//! in one statement, and the records that arrive meanwhile go into the next one. An idle
//! log writes a record the moment it arrives; a busy one adds no delay, it batches.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::store::{SentEmail, Store};

type Waiter = (SentEmail, oneshot::Sender<Result<(), String>>);

pub struct EmailLog {
    store: Arc<dyn Store>,
    /// Records waiting for the next write, with whom to answer.
    pending: Mutex<Vec<Waiter>>,
    /// Held by the one write in flight.
    writing: tokio::sync::Mutex<()>,
}

impl EmailLog {
    pub fn new(store: Arc<dyn Store>) -> Self {
        EmailLog { store, pending: Mutex::new(Vec::new()), writing: tokio::sync::Mutex::new(()) }
    }

    /// Records `sent` (durably, when this returns `Ok`); a key already recorded is fine.
    pub async fn record(&self, sent: SentEmail) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((sent, tx));
        {
            let _turn = self.writing.lock().await;
            let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            if !batch.is_empty() {
                let records: Vec<SentEmail> = batch.iter().map(|(s, _)| s.clone()).collect();
                let result = self.store.record_emails(&records).await.map(|_| ()).map_err(|e| e.to_string());
                for (_, waiter) in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        }
        // Ours was written by us, or by the write before ours.
        rx.await.unwrap_or_else(|_| Err("the email log write was abandoned".into()))
    }
}
