//! `auth_code_email`: sends a one-time code (email verification or password reset).
//!
//! The code travels sealed (AES-256-GCM under `EVENTRA_SECRET_KEY`): the job queue,
//! Redis or SQLite, never holds it in clear, and the database holds only its HMAC. A
//! retry sends the same code again, with the same `Message-ID`, so it is recognisable
//! as the same message; a code that expired meanwhile is not sent at all.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JobFailure, JobKind};
use crate::jobs::{Job, NewJob};
use crate::mail::{Email, MailError, Mailer};
use crate::webhooks::secret_box::SecretBox;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthCodeArgs {
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub email: String,
    /// `verify` or `reset`.
    pub purpose: String,
    /// Names this code (its email's `Message-ID`, the job's key).
    pub code_id: Uuid,
    pub sealed_code: String,
    pub expires_at: DateTime<Utc>,
}

impl AuthCodeArgs {
    pub fn job(&self) -> NewJob {
        NewJob::new("auth_code_email", format!("auth_code_email:{}", self.code_id), serde_json::json!(self))
    }
}

pub struct AuthCodeEmail {
    mailer: Arc<dyn Mailer>,
    from: String,
    sealer: Arc<SecretBox>,
}

impl AuthCodeEmail {
    pub fn new(mailer: Arc<dyn Mailer>, from: String, sealer: Arc<SecretBox>) -> Self {
        AuthCodeEmail { mailer, from, sealer }
    }
}

#[async_trait]
impl JobKind for AuthCodeEmail {
    fn name(&self) -> &'static str {
        "auth_code_email"
    }

    /// A code lives 15 minutes: retrying for longer is pointless.
    fn max_attempts(&self) -> u32 {
        5
    }

    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        let args = AuthCodeArgs::deserialize(&job.args)
            .map_err(|e| JobFailure::permanent(format!("args are not an auth code email: {e}")))?;
        if args.expires_at <= Utc::now() {
            tracing::info!(user_id = %args.user_id, purpose = %args.purpose, "code expired before its email went out; not sent");
            return Ok(());
        }
        let code = self.sealer.open(&args.sealed_code).map_err(|e| JobFailure::permanent(e.to_string()))?;
        let minutes = (args.expires_at - Utc::now()).num_minutes().max(1);
        let (subject, what) = match args.purpose.as_str() {
            "reset" => ("Your password reset code", "reset your password"),
            _ => ("Your verification code", "verify your email address"),
        };
        let email = Email {
            message_id: format!("code.{}@eventra", args.code_id),
            from: self.from.clone(),
            to: args.email.clone(),
            subject: subject.into(),
            text: format!(
                "Your code to {what} is {code}.\n\nIt is valid for {minutes} minutes and can be tried 5 times. \
                 If you did not ask for it, ignore this email.\n"
            ),
        };
        match self.mailer.send(&email).await {
            Ok(()) => {
                tracing::info!(tenant_id = %args.tenant_id, user_id = %args.user_id, purpose = %args.purpose, "code email sent");
                Ok(())
            }
            Err(MailError::Invalid(e)) => Err(JobFailure::permanent(e)),
            Err(e) => Err(JobFailure::new(e)),
        }
    }
}
