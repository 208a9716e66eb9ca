//! SMTP delivery through lettre's pooled async transport (rustls for `smtps://` and
//! `?tls=required`).

use async_trait::async_trait;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Email, MailError, Mailer};

/// Most pooled SMTP connections (concurrent sends) per process.
const SMTP_CONNECTIONS: u32 = 16;

pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl SmtpMailer {
    /// `smtp://[user:pass@]host[:port][?tls=required]` or `smtps://…`.
    pub fn from_url(url: &str) -> Result<Self, MailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| MailError::Invalid(format!("SMTP_URL: {e}")))?
            // Per SMTP command; a whole send is also bounded by the job's lease (see
            // `jobs::kinds::welcome_email`).
            .timeout(Some(std::time::Duration::from_secs(10)))
            .pool_config(lettre::transport::smtp::PoolConfig::new().max_size(SMTP_CONNECTIONS))
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
