//! `welcome_email`: one welcome email per user, ever.
//!
//! Four guards make "one" hold:
//! - the job's idempotency key (`welcome_email:<user id>`) drops duplicate events before
//!   they become jobs;
//! - the `email_log` row, written right after the send, stops a later job (after the
//!   key's retention, or an operator's retry) from sending again;
//! - the send is **fenced on the lease**: it starts only after a heartbeat confirmed the
//!   lease, and must finish before that confirmed lease could lapse (else it is
//!   abandoned and retried), so the reaper never hands the job to a second worker while
//!   the first may still be sending;
//! - the send is **claimed** (`Store::claim_emails`, a row in the database, one
//!   statement for the batch): a sent email's record may be held up by a database
//!   outage (it is retried for up to 2 minutes), and the attempt's lease may lapse
//!   meanwhile (a killed worker actor, a job-queue outage). Another attempt, in this
//!   process or another, then finds no record, but the claim: it fails and is retried
//!   instead of sending again. The claim outlives the lease by 30 s, ends with the
//!   record, and is given up at once when the send fails. Within the process, a set of
//!   the users whose email is unrecorded backs it up past that time.
//!
//! The windows left, where a retry sends again: a crash between the server accepting
//! the message and the `email_log` row (a few milliseconds); a record held up for
//! longer than the claim; a send the server took just as it was abandoned at the
//! fence. The resend carries the same `Message-ID` (`welcome.<user id>@eventra`), so
//! mail systems can recognise the duplicate and the file sink overwrites its file.
//!
//! A leased batch shares one `email_log` look-up, one fence and one claim; its sends run
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
    store: Arc<dyn Store>,
    mailer: Arc<dyn Mailer>,
    from: String,
    /// Where sent emails are recorded (group commit across concurrent sends).
    log: EmailLog,
    /// Users whose email a task of this process is sending or has sent and not yet
    /// recorded. Another attempt at the same job must not send it again meanwhile:
    /// one whose earlier attempt's lease lapsed (a killed worker, a job-queue outage)
    /// while that attempt's record was held up (a database outage) would find no
    /// record yet.
    unrecorded: Arc<UnrecordedSet>,
}

#[derive(Default)]
struct UnrecordedSet(Mutex<HashSet<Uuid>>);

impl UnrecordedSet {
    /// The user's entry, for the task that sends and records the email; `None` while
    /// another task holds it.
    fn take(self: &Arc<Self>, user_id: Uuid) -> Option<Unrecorded> {
        let fresh = self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(user_id);
        fresh.then(|| Unrecorded { set: self.clone(), user_id })
    }
}

/// A user's entry in [`Delivery::unrecorded`]; it leaves the set when its task ends,
/// whatever the outcome.
struct Unrecorded {
    set: Arc<UnrecordedSet>,
    user_id: Uuid,
}

impl Drop for Unrecorded {
    fn drop(&mut self) {
        self.set.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.user_id);
    }
}

impl WelcomeEmail {
    pub fn new(store: Arc<dyn Store>, mailer: Arc<dyn Mailer>, from: String) -> Self {
        let log = EmailLog::new(store.clone());
        let delivery = Delivery { store: store.clone(), log, mailer, from, unrecorded: Arc::default() };
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
/// How long an attempt's claim on its sends outlives its lease (`Store::claim_emails`):
/// room for a record held up by a short database outage, while a process killed
/// after claiming delays those emails by no more than this.
const CLAIM_BEYOND_LEASE: Duration = Duration::from_secs(30);

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

    /// Sends one email before `deadline` and records it at once. `holder` claimed the
    /// send: the claim guards the sent email until its record lands, and is given up
    /// at once when the send failed or was abandoned (as before claims, a send the
    /// server took just as it was abandoned can then go out again).
    async fn send_and_record(
        &self,
        args: &WelcomeArgs,
        deadline: tokio::time::Instant,
        holder: &str,
    ) -> Result<(), JobFailure> {
        let email = self.email_of(args);
        let failed = match tokio::time::timeout_at(deadline, self.mailer.send(&email)).await {
            Err(_) => JobFailure::new("the send did not finish within the confirmed lease; abandoned (retried later)"),
            Ok(Err(e @ MailError::Invalid(_))) => JobFailure::permanent(e),
            Ok(Err(e @ MailError::Transport(_))) => JobFailure::new(e),
            Ok(Ok(())) => return self.record(args, email.message_id).await,
        };
        if let Err(e) = self.store.release_emails(&[log_key(args.user_id)], holder).await {
            tracing::warn!(user_id = %args.user_id, error = %e, "a failed send's claim was not released; it lapses");
        }
        Err(failed)
    }

    /// Records a sent email, waiting out a database outage.
    async fn record(&self, args: &WelcomeArgs, message_id: String) -> Result<(), JobFailure> {
        let sent = SentEmail {
            key: log_key(args.user_id),
            tenant_id: args.tenant_id,
            recipient: args.email.clone(),
            message_id,
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
        let unsent: Vec<String> = keys.iter().filter(|k| !sent.contains(*k)).cloned().collect();
        // Sends start only within the confirmed lease, and only those this attempt
        // claimed: no other attempt, in any process, is sending them or waiting for
        // their record.
        let holder = ctx.lease().to_string();
        let gate = if unsent.is_empty() {
            Ok(None)
        } else {
            match ctx.fence().await {
                Ok(deadline) => {
                    match self.store.claim_emails(&unsent, &holder, ctx.lease_for() + CLAIM_BEYOND_LEASE).await {
                        Ok(claimed) => Ok(Some((deadline, claimed))),
                        Err(e) => Err(JobFailure::new(e)),
                    }
                }
                Err(failure) => Err(failure),
            }
        };
        let gate = match gate {
            Ok(gate) => gate,
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
        };
        let mut seen = std::collections::HashSet::new();
        let (sent, gate, holder) = (&sent, &gate, &holder);
        futures_util::stream::iter(parsed)
            .map(|p| {
                let first = p.as_ref().is_ok_and(|a| seen.insert(a.user_id));
                async move {
                    let args = p?;
                    if sent.contains(&log_key(args.user_id)) || !first {
                        tracing::info!(user_id = %args.user_id, "welcome email already sent; not sending again");
                        return Ok(());
                    }
                    let Some((deadline, claimed)) = gate else { return Ok(()) };
                    if !claimed.contains(&log_key(args.user_id)) {
                        return Err(JobFailure::new(
                            "another attempt (here or in another process) claimed this email's send and has not \
                             recorded it; not sending it again",
                        ));
                    }
                    let Some(unrecorded) = self.delivery.unrecorded.take(args.user_id) else {
                        return Err(JobFailure::new(
                            "an earlier attempt sent this email and its record is pending; not sending it again",
                        ));
                    };
                    // In a task of its own: a worker killed mid-send (a chaos kill, a
                    // timeout) drops its futures, and a send dropped after the server
                    // accepted it would go unrecorded and be sent again. The task
                    // finishes the send (within the fence) and its record either way.
                    let (delivery, deadline, holder) = (self.delivery.clone(), *deadline, holder.clone());
                    tokio::spawn(async move {
                        let _unrecorded = unrecorded;
                        delivery.send_and_record(&args, deadline, &holder).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One task at a time holds a user's unsent or unrecorded email; the entry leaves
    /// when its holder is dropped, whatever ended it.
    #[test]
    fn an_unrecorded_email_is_held_by_one_task_until_it_ends() {
        let set = Arc::new(UnrecordedSet::default());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let held = set.take(a).expect("free");
        assert!(set.take(a).is_none(), "held by the first task");
        assert!(set.take(b).is_some(), "another user's is free");
        drop(held);
        assert!(set.take(a).is_some(), "free again once it ended");
    }
}
