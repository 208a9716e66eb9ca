//! SMTP delivery through lettre's pooled async transport (rustls for `smtps://` and
//! `?tls=required`).

use async_trait::async_trait;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Email, MailError, Mailer};

pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl SmtpMailer {
    /// `smtp://[user:pass@]host[:port][?tls=required]` or `smtps://…`.
    pub fn from_url(url: &str) -> Result<Self, MailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| MailError::Invalid(format!("SMTP_URL: {e}")))?
            .timeout(Some(std::time::Duration::from_secs(30)))
            .build();
        Ok(SmtpMailer { transport })
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    fn kind(&self) -> &'static str {
        "smtp"
    }

    async fn send(&self, email: &Email) -> Result<(), MailError> {
        let message = email.to_message()?;
        self.transport.send(message).await.map_err(|e| {
            if e.is_permanent() {
                MailError::Invalid(format!("the SMTP server refused the message: {e}"))
            } else {
                MailError::Transport(e.to_string())
            }
        })?;
        Ok(())
    }
}
