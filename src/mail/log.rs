//! The record of sent emails (`email_log`), written with group commit
//! ([`GroupWrite`]): a sent email must be recorded at once, since until its row commits
//! a crash makes a retry send it again, and concurrent sends share one statement.

use std::sync::Arc;

use crate::store::{GroupWrite, SentEmail, Store};

pub struct EmailLog {
    store: Arc<dyn Store>,
    group: GroupWrite<SentEmail, ()>,
}

impl EmailLog {
    pub fn new(store: Arc<dyn Store>) -> Self {
        EmailLog { store, group: GroupWrite::default() }
    }

    /// Records `sent` (durably, when this returns `Ok`); a key already recorded is fine.
    pub async fn record(&self, sent: SentEmail) -> Result<(), String> {
        let store = &self.store;
        self.group
            .submit(vec![sent], |all| async move {
                let n = all.len();
                store.record_emails(&all).await.map(|_| vec![(); n]).map_err(|e| e.to_string())
            })
            .await
            .map(|_| ())
    }
}
