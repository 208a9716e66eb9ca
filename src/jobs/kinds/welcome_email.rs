//! `welcome_email`: one welcome email per user, ever.
//!
//! Two guards make "one" hold: the job's idempotency key (`welcome_email:<user id>`)
//! drops duplicate events before they become jobs, and the `email_log` row, written
//! after the send, stops a second job (after the key's retention, or an operator's
//! retry) from sending again. A crash between the send and the row can resend once;
//! the message keeps its `Message-ID` (`welcome.<user id>@eventra`), so the file sink
//! overwrites its file and mail systems can recognise the duplicate.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JobFailure, JobKind};
use crate::jobs::{Job, NewJob};
use crate::mail::{Email, MailError, Mailer};
use crate::store::{SentEmail, Store};

/// The job's arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WelcomeArgs {
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
}

impl WelcomeArgs {
    pub fn job(&self) -> NewJob {
        NewJob::new("welcome_email", format!("welcome_email:{}", self.user_id), serde_json::json!(self))
    }
}

pub struct WelcomeEmail {
    store: Arc<dyn Store>,
    mailer: Arc<dyn Mailer>,
    from: String,
}

impl WelcomeEmail {
    pub fn new(store: Arc<dyn Store>, mailer: Arc<dyn Mailer>, from: String) -> Self {
        WelcomeEmail { store, mailer, from }
    }

    pub fn message_id(user_id: Uuid) -> String {
        format!("welcome.{user_id}@eventra")
    }
}

#[async_trait]
impl JobKind for WelcomeEmail {
    fn name(&self) -> &'static str {
        "welcome_email"
    }

    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        let args: WelcomeArgs = serde_json::from_value(job.args.clone())
            .map_err(|e| JobFailure::permanent(format!("welcome_email args: {e}")))?;
        let key = format!("welcome:{}", args.user_id);
        if self.store.email_sent(&key).await.map_err(JobFailure::new)? {
            tracing::info!(user_id = %args.user_id, "welcome email already sent; not sending again");
            return Ok(());
        }
        let email = Email {
            message_id: Self::message_id(args.user_id),
            from: self.from.clone(),
            to: args.email.clone(),
            subject: format!("Welcome, {}", args.name),
            text: format!(
                "Hello {},\n\nyour account ({}) is ready.\n\nThis message was sent once, when your account was created.\n",
                args.name, args.email
            ),
        };
        self.mailer.send(&email).await.map_err(|e| match e {
            MailError::Invalid(_) => JobFailure::permanent(e),
            MailError::Transport(_) => JobFailure::new(e),
        })?;
        let sent = SentEmail {
            key,
            tenant_id: args.tenant_id,
            recipient: args.email,
            message_id: email.message_id,
            sent_at: crate::domain::now(),
        };
        self.store.record_email(&sent).await.map_err(JobFailure::new)?;
        tracing::info!(user_id = %args.user_id, via = self.mailer.kind(), "welcome email sent");
        Ok(())
    }
}
