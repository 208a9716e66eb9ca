//! SMTP delivery: lettre's SMTP client (protocol, STARTTLS and implicit TLS over rustls,
//! AUTH) on connections this module pools itself.
//!
//! ## Design note: why not lettre's pool
//! lettre's pooled transport has two costs that cap a busy process far below what the
//! mail server can take:
//! - it opens a new connection whenever none is idle and closes it on return when the
//!   pool is full, so more concurrent sends than pooled connections open and close a
//!   connection (connect, EHLO, QUIT) per message: a connection storm at the server;
//! - its sockets keep Nagle's algorithm on, and the client writes a message's body and
//!   its final `.` in two writes: on a reused connection the second write waits for the
//!   server's delayed ACK, about 40 ms per message (measured: ~25 messages/s per
//!   connection on loopback). New connections hide this (Linux acks them at once), which
//!   is why the storm looked fast.
//!
//! So: at most [`SMTP_CONNECTIONS`] sends at once (more wait for a permit), on idle
//! connections reused most-recent first, with `TCP_NODELAY` set. A connection idle for
//! more than [`PROBE_AFTER`] is probed (`NOOP`) before reuse, one idle past
//! [`IDLE_FOR`] is dropped, and one that failed a send is never reused.
//! `smtps://` (implicit TLS) connects through lettre's own connector, which does not
//! set `TCP_NODELAY`: prefer STARTTLS (`?tls=required`) for throughput.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;

use super::{Email, MailError, Mailer};

/// Most concurrent sends (and so connections) per process.
const SMTP_CONNECTIONS: usize = 16;
/// Bound on a connect with its greeting, TLS and AUTH.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one message's MAIL, RCPT and DATA.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the `QUIT` that closes a connection after a failure.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle connection older than this is probed with `NOOP` before it is reused.
const PROBE_AFTER: Duration = Duration::from_secs(2);
/// An idle connection older than this is closed rather than reused (servers drop idle
/// clients after a few minutes; lettre's default is 60 s too).
const IDLE_FOR: Duration = Duration::from_secs(60);

/// How the connection is secured, as the URL says.
#[derive(Clone)]
enum Security {
    Plain,
    /// `?tls=required` (refuse a server without STARTTLS) or `?tls=opportunistic`.
    StartTls {
        params: TlsParameters,
        required: bool,
    },
    /// `smtps://`: TLS from the first byte.
    Implicit(TlsParameters),
}

struct Idle {
    connection: AsyncSmtpConnection,
    since: Instant,
}

pub struct SmtpMailer {
    host: String,
    port: u16,
    security: Security,
    credentials: Option<Credentials>,
    hello: ClientId,
    idle: std::sync::Mutex<Vec<Idle>>,
    permits: tokio::sync::Semaphore,
}

impl SmtpMailer {
    /// `smtp://[user:pass@]host[:port][?tls=required|opportunistic]` or
    /// `smtps://[user:pass@]host[:port]`; a path names the EHLO domain. Default ports as
    /// lettre's: 25 (plain), 587 (STARTTLS), 465 (implicit TLS).
    pub fn from_url(url: &str) -> Result<Self, MailError> {
        let bad = |why: String| MailError::Invalid(format!("SMTP_URL: {why}"));
        let url = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host".into()))?.to_owned();
        // IPv6 literals come bracketed; connect and TLS want the bare address.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let tls = url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
        let params = || TlsParameters::new(host.clone()).map_err(|e| bad(format!("TLS for {host}: {e}")));
        let (security, default_port) = match (url.scheme(), tls.as_deref()) {
            ("smtp", None) => (Security::Plain, 25),
            ("smtp", Some("required")) => (Security::StartTls { params: params()?, required: true }, 587),
            ("smtp", Some("opportunistic")) => (Security::StartTls { params: params()?, required: false }, 587),
            ("smtps", None) => (Security::Implicit(params()?), 465),
            (scheme, tls) => {
                return Err(bad(format!(
                    "unknown scheme {scheme:?} or tls={tls:?} (smtp:// with tls=required|opportunistic, or smtps://)"
                )))
            }
        };
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        let credentials = url.password().map(|p| Credentials::new(decode(url.username()), decode(p)));
        let name = url.path().trim_matches('/');
        let hello = if name.is_empty() { ClientId::default() } else { ClientId::Domain(name.to_owned()) };
        Ok(SmtpMailer {
            port: url.port().unwrap_or(default_port),
            host,
            security,
            credentials,
            hello,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(SMTP_CONNECTIONS),
        })
    }

    /// A new connection: TCP (no Nagle), greeting, TLS, AUTH.
    async fn connect(&self) -> Result<AsyncSmtpConnection, MailError> {
        let transport = |e: lettre::transport::smtp::Error| MailError::Transport(e.to_string());
        let connect = async {
            let mut connection = match &self.security {
                Security::Implicit(params) => AsyncSmtpConnection::connect_tokio1(
                    (self.host.as_str(), self.port),
                    Some(CONNECT_TIMEOUT),
                    &self.hello,
                    Some(params.clone()),
                    None,
                )
                .await
                .map_err(transport)?,
                _ => {
                    let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                        .await
                        .map_err(|e| MailError::Transport(format!("connect {}:{}: {e}", self.host, self.port)))?;
                    tcp.set_nodelay(true).map_err(|e| MailError::Transport(e.to_string()))?;
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await.map_err(transport)?
                }
            };
            if let Security::StartTls { params, required } = &self.security {
                if connection.can_starttls() {
                    connection.starttls(params.clone(), &self.hello).await.map_err(transport)?;
                } else if *required {
                    let _ = tokio::time::timeout(QUIT_TIMEOUT, connection.abort()).await;
                    return Err(MailError::Transport(format!("{} does not offer STARTTLS (tls=required)", self.host)));
                }
            }
            if let Some(credentials) = &self.credentials {
                connection.auth(&[Mechanism::Plain, Mechanism::Login], credentials).await.map_err(transport)?;
            }
            Ok(connection)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect).await.map_err(|_| {
            MailError::Transport(format!("no SMTP session with {}:{} within {CONNECT_TIMEOUT:?}", self.host, self.port))
        })?
    }

    /// An idle connection that still answers, or a new one.
    async fn connection(&self) -> Result<AsyncSmtpConnection, MailError> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(Idle { mut connection, since }) = idle else { return self.connect().await };
            let age = since.elapsed();
            if age > IDLE_FOR || connection.has_broken() {
                continue; // dropped: the socket closes
            }
            if age > PROBE_AFTER {
                let alive = tokio::time::timeout(CONNECT_TIMEOUT, connection.test_connected()).await.unwrap_or(false);
                if !alive {
                    continue;
                }
            }
            return Ok(connection);
        }
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    fn kind(&self) -> &'static str {
        "smtp"
    }

    async fn send(&self, email: &Email) -> Result<(), MailError> {
        let message = email.to_message()?;
        let bytes = message.formatted();
        let _permit = self.permits.acquire().await.map_err(|e| MailError::Transport(e.to_string()))?;
        let mut connection = self.connection().await?;
        match tokio::time::timeout(SEND_TIMEOUT, connection.send(message.envelope(), &bytes)).await {
            Ok(Ok(_)) => {
                if !connection.has_broken() {
                    let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                    idle.push(Idle { connection, since: Instant::now() });
                }
                Ok(())
            }
            // A failed transaction leaves the session in an unknown state: not reused.
            Ok(Err(e)) if e.is_permanent() => {
                let _ = tokio::time::timeout(QUIT_TIMEOUT, connection.abort()).await;
                Err(MailError::Invalid(format!("the SMTP server refused the message: {e}")))
            }
            Ok(Err(e)) => {
                let _ = tokio::time::timeout(QUIT_TIMEOUT, connection.abort()).await;
                Err(MailError::Transport(e.to_string()))
            }
            Err(_) => Err(MailError::Transport(format!("no answer to the message within {SEND_TIMEOUT:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_security_and_credentials() {
        let m = SmtpMailer::from_url("smtp://mail.example.com").unwrap();
        assert_eq!((m.host.as_str(), m.port), ("mail.example.com", 25));
        assert!(matches!(m.security, Security::Plain) && m.credentials.is_none());
        let m = SmtpMailer::from_url("smtp://u%40x:p%2Fw@mail.example.com?tls=required").unwrap();
        assert_eq!(m.port, 587);
        assert!(matches!(m.security, Security::StartTls { required: true, .. }));
        assert_eq!(m.credentials, Some(Credentials::new("u@x".into(), "p/w".into())));
        let m = SmtpMailer::from_url("smtps://[::1]:2465/relay.example.com").unwrap();
        assert_eq!((m.host.as_str(), m.port), ("::1", 2465));
        assert!(matches!(m.security, Security::Implicit(_)));
        assert_eq!(m.hello, ClientId::Domain("relay.example.com".into()));
        for bad in ["http://x", "smtp://x?tls=maybe", "smtp://", "not a url"] {
            assert!(matches!(SmtpMailer::from_url(bad), Err(MailError::Invalid(_))), "{bad}");
        }
    }
}
