//! Outgoing email behind one [`Mailer`] trait: SMTP via lettre when `SMTP_URL` is set,
//! else `.eml` files under `data/mail/` (the embedded default).
//!
//! A mailer delivers what it is given; "one email per user" is the job handler's rule
//! (`jobs::kinds::welcome_email`), kept with the `email_log` table. Every message carries
//! a deterministic `Message-ID`, so even a resend after a crash between "sent" and
//! "recorded" is recognisable as the same message downstream, and the file sink writes
//! it to the same file.

mod file;
pub mod log;
mod smtp;

use async_trait::async_trait;

pub use file::FileMailer;
pub use log::EmailLog;
pub use smtp::SmtpMailer;

/// A plain-text email.
#[derive(Debug, Clone, PartialEq)]
pub struct Email {
    /// Without angle brackets, e.g. `welcome.<user id>@eventra`.
    pub message_id: String,
    pub from: String,
    pub to: String,
    pub subject: String,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The message cannot be sent as it is (bad address…): retrying will not help.
    #[error("invalid email: {0}")]
    Invalid(String),
    /// The transport failed (server down, refused, disk…): a retry may succeed.
    #[error("mail transport: {0}")]
    Transport(String),
}

#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    /// `smtp` or `file`, for logs and `/health/ready`.
    fn kind(&self) -> &'static str;
    async fn send(&self, email: &Email) -> Result<(), MailError>;
}

impl Email {
    /// The RFC 5322 message, as sent over SMTP and as written to `.eml` files.
    pub fn to_message(&self) -> Result<lettre::Message, MailError> {
        let parse = |what: &str, v: &str| -> Result<lettre::message::Mailbox, MailError> {
            v.parse().map_err(|e| MailError::Invalid(format!("{what} address {v:?}: {e}")))
        };
        lettre::Message::builder()
            .message_id(Some(format!("<{}>", self.message_id)))
            .from(parse("from", &self.from)?)
            .to(parse("to", &self.to)?)
            .subject(self.subject.clone())
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(self.text.clone())
            .map_err(|e| MailError::Invalid(e.to_string()))
    }
}

/// The mailer a config names: SMTP for `smtp://` / `smtps://` URLs, else files in `dir`.
pub fn from_config(smtp_url: Option<&str>, dir: std::path::PathBuf) -> Result<std::sync::Arc<dyn Mailer>, MailError> {
    Ok(match smtp_url {
        Some(url) => std::sync::Arc::new(SmtpMailer::from_url(url)?),
        None => std::sync::Arc::new(FileMailer::new(dir)),
    })
}
