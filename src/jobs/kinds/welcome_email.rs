//! `welcome_email`: one welcome email per user, ever.
//!
//! Three guards make "one" hold:
//! - the job's idempotency key (`welcome_email:<user id>`) drops duplicate events before
//!   they become jobs;
//! - the `email_log` row, written right after the send, stops a later job (after the
//!   key's retention, or an operator's retry) from sending again;
//! - the send is **fenced on the lease**: it starts only after a heartbeat confirmed the
//!   lease, and must finish before that confirmed lease could lapse (else it is
//!   abandoned and retried), so the reaper never hands the job to a second worker while
//!   the first may still be sending.
//!
//! A database outage right after a send is waited out (the record is retried while the
//! lease is kept alive). Should the lease lapse meanwhile (a killed worker actor, a
//! job-queue outage), another attempt at the job in this process finds the email
//! still unrecorded and fails (retried later) instead of sending it again. Two windows
//! are left, where a retry sends again:
//! - a crash between the server accepting the message and the `email_log` row (a few
//!   milliseconds);
//! - with several processes, another process's attempt while this one's record is
//!   held up past the lease (a database outage overlapping a job-queue outage).
//!
//! The resend carries the same `Message-ID` (`welcome.<user id>@eventra`), so mail
//! systems can recognise the duplicate and the file sink overwrites its file.
//!
//! A leased batch shares one `email_log` look-up and one fence; its sends run
//! concurrently (bounded), each recorded as soon as it is accepted (through
//! [`EmailLog`], which writes the records of concurrent sends in one statement).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JobContext, JobFailure, JobKind};
use crate::jobs::{Job, NewJob};
use crate::mail::{Email, EmailLog, MailError, Mailer};
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
    delivery: Arc<Delivery>,
}

/// What a send needs, shared with the task each send runs in.
struct Delivery {
    mailer: Arc<dyn Mailer>,
    from: String,
    /// Where sent emails are recorded (group commit across concurrent sends).
    log: EmailLog,
    /// Users whose email a task of this process is sending or has sent and not yet
    /// recorded. Another attempt at the same job must not send it again meanwhile:
    /// one whose earlier attempt's lease lapsed (a killed worker, a job-queue outage)
    /// while that attempt's record was held up (a database outage) would find no
    /// record yet.
    unrecorded: Mutex<HashSet<Uuid>>,
}

/// A user's entry in [`Delivery::unrecorded`], held by the task that sends and
/// records the email; it leaves the set when that task ends, whatever its outcome.
struct Unrecorded {
    delivery: Arc<Delivery>,
    user_id: Uuid,
}

impl Unrecorded {
    /// `None` while another task has this user's email unrecorded.
    fn take(delivery: &Arc<Delivery>, user_id: Uuid) -> Option<Self> {
        let fresh = delivery.unrecorded.lock().unwrap_or_else(|e| e.into_inner()).insert(user_id);
        fresh.then(|| Unrecorded { delivery: delivery.clone(), user_id })
    }
}

impl Drop for Unrecorded {
    fn drop(&mut self) {
        self.delivery.unrecorded.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.user_id);
    }
}

impl WelcomeEmail {
    pub fn new(store: Arc<dyn Store>, mailer: Arc<dyn Mailer>, from: String) -> Self {
        let delivery = Delivery { log: EmailLog::new(store.clone()), mailer, from, unrecorded: Mutex::default() };
        WelcomeEmail { delivery: Arc::new(delivery), store }
    }

    pub fn message_id(user_id: Uuid) -> String {
        format!("welcome.{user_id}@eventra")
    }
}

/// Most sends of one batch in flight at once.
const SEND_CONCURRENCY: usize = 16;
/// How long a sent email's record is retried (a database outage) before the job fails
/// and a retry would send the email again.
const RECORD_PATIENCE: Duration = Duration::from_secs(120);

impl Delivery {
    fn email_of(&self, args: &WelcomeArgs) -> Email {
        Email {
            message_id: WelcomeEmail::message_id(args.user_id),
            from: self.from.clone(),
            to: args.email.clone(),
            subject: format!("Welcome, {}", args.name),
            text: format!(
                "Hello {},\n\nyour account ({}) is ready.\n\nThis message was sent once, when your account was created.\n",
                args.name, args.email
            ),
        }
    }

    /// Sends one email before `deadline` and records it at once.
    async fn send_and_record(&self, args: &WelcomeArgs, deadline: tokio::time::Instant) -> Result<(), JobFailure> {
        let email = self.email_of(args);
        match tokio::time::timeout_at(deadline, self.mailer.send(&email)).await {
            Err(_) => {
                return Err(JobFailure::new(
                    "the send did not finish within the confirmed lease; abandoned (retried later)",
                ))
            }
            Ok(Err(e @ MailError::Invalid(_))) => return Err(JobFailure::permanent(e)),
            Ok(Err(e @ MailError::Transport(_))) => return Err(JobFailure::new(e)),
            Ok(Ok(())) => {}
        }
        let sent = SentEmail {
            key: log_key(args.user_id),
            tenant_id: args.tenant_id,
            recipient: args.email.clone(),
            message_id: email.message_id,
            sent_at: crate::domain::now(),
        };
        // Sent: now it must be recorded, or a retry sends it again. A database outage
        // is waited out here (the runner keeps the lease alive meanwhile) rather than
        // failing the job; only a crash in between can cause a resend.
        let mut pause = Duration::from_millis(100);
        let give_up = tokio::time::Instant::now() + RECORD_PATIENCE;
        while let Err(e) = self.log.record(sent.clone()).await {
            if tokio::time::Instant::now() + pause > give_up {
                tracing::error!(user_id = %args.user_id, error = %e,
                    "welcome email sent but not recorded; a retry will send it again (same Message-ID)");
                return Err(JobFailure::new(e));
            }
            tracing::warn!(user_id = %args.user_id, error = %e, retry_in = ?pause,
                "welcome email sent; recording it failed, trying again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        tracing::info!(user_id = %args.user_id, via = self.mailer.kind(), "welcome email sent");
        Ok(())
    }
}

/// The `email_log` key of a user's welcome email.
fn log_key(user_id: Uuid) -> String {
    format!("welcome:{user_id}")
}

#[async_trait]
impl JobKind for WelcomeEmail {
    fn name(&self) -> &'static str {
        "welcome_email"
    }

    async fn run_batch(&self, jobs: &[&Job], ctx: &JobContext) -> Vec<Result<(), JobFailure>> {
        use futures_util::StreamExt;
        let parsed: Vec<Result<WelcomeArgs, JobFailure>> = jobs
            .iter()
            .map(|j| {
                WelcomeArgs::deserialize(&j.args).map_err(|e| JobFailure::permanent(format!("welcome_email args: {e}")))
            })
            .collect();
        let keys: Vec<String> = parsed.iter().filter_map(|p| p.as_ref().ok()).map(|a| log_key(a.user_id)).collect();
        let sent = match self.store.emails_sent(&keys).await {
            Ok(sent) => sent,
            Err(e) => {
                let failure = JobFailure::new(e);
                return parsed.into_iter().map(|p| p.and(Err(failure.clone()))).collect();
            }
        };
        let to_send = parsed.iter().filter(|p| p.as_ref().is_ok_and(|a| !sent.contains(&log_key(a.user_id)))).count();
        let deadline = if to_send > 0 {
            match ctx.fence().await {
                Ok(d) => Some(d),
                Err(failure) => {
                    return parsed
                        .into_iter()
                        .map(|p| match p {
                            Ok(a) if sent.contains(&log_key(a.user_id)) => Ok(()),
                            Ok(_) => Err(failure.clone()),
                            Err(bad) => Err(bad),
                        })
                        .collect()
                }
            }
        } else {
            None
        };
        let mut seen = std::collections::HashSet::new();
        let sent = &sent;
        futures_util::stream::iter(parsed)
            .map(|p| {
                let first = p.as_ref().is_ok_and(|a| seen.insert(a.user_id));
                async move {
                    let args = p?;
                    if sent.contains(&log_key(args.user_id)) || !first {
                        tracing::info!(user_id = %args.user_id, "welcome email already sent; not sending again");
                        return Ok(());
                    }
                    let Some(deadline) = deadline else { return Ok(()) };
                    let Some(unrecorded) = Unrecorded::take(&self.delivery, args.user_id) else {
                        return Err(JobFailure::new(
                            "an earlier attempt sent this email and its record is pending; not sending it again",
                        ));
                    };
                    // In a task of its own: a worker killed mid-send (a chaos kill, a
                    // timeout) drops its futures, and a send dropped after the server
                    // accepted it would go unrecorded and be sent again. The task
                    // finishes the send (within the fence) and its record either way.
                    let delivery = self.delivery.clone();
                    tokio::spawn(async move {
                        let _unrecorded = unrecorded;
                        delivery.send_and_record(&args, deadline).await
                    })
                    .await
                    .unwrap_or_else(|e| Err(JobFailure::new(format!("the send task failed: {e}"))))
                }
            })
            .buffered(SEND_CONCURRENCY)
            .collect()
            .await
    }
}
