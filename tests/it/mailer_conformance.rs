//! The `Mailer` conformance suite: the same functions run against the `.eml` file sink
//! and against SMTP (lettre) talking to a real SMTP server on loopback (mailin-embedded,
//! started by the test).

use std::sync::{Arc, Mutex};

use eventra::mail::{Email, FileMailer, MailError, Mailer, SmtpMailer};

/// Messages a backend delivered, as raw RFC 5322 text.
pub type Inbox = Arc<dyn Fn() -> Vec<String> + Send + Sync>;
type Make = fn() -> (Box<dyn std::any::Any + Send>, Arc<dyn Mailer>, Inbox);

/// A real SMTP server on 127.0.0.1 (mailin-embedded, one thread), keeping every
/// message it accepts.
pub mod smtp_server {
    use super::*;

    #[derive(Clone, Default)]
    struct Keep {
        current: Vec<u8>,
        inbox: Arc<Mutex<Vec<String>>>,
        /// HELO/EHLO greetings seen: one per client connection.
        greetings: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl mailin_embedded::Handler for Keep {
        fn helo(&mut self, _: std::net::IpAddr, _: &str) -> mailin_embedded::Response {
            self.greetings.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            mailin_embedded::response::OK
        }
        fn data_start(&mut self, _: &str, _: &str, _: bool, _: &[String]) -> mailin_embedded::Response {
            self.current.clear();
            mailin_embedded::response::OK
        }
        fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
            self.current.extend_from_slice(buf);
            Ok(())
        }
        fn data_end(&mut self) -> mailin_embedded::Response {
            let text = String::from_utf8_lossy(&self.current).into_owned();
            if let Ok(mut inbox) = self.inbox.lock() {
                inbox.push(text);
            }
            mailin_embedded::response::OK
        }
    }

    /// Starts a server; returns its `smtp://` URL and its inbox. The server thread
    /// lives as long as the test process.
    pub fn start() -> (String, Arc<Mutex<Vec<String>>>) {
        let (url, inbox, _) = start_counting();
        (url, inbox)
    }

    /// [`start`], also counting the connections clients open (their greetings).
    pub fn start_counting() -> (String, Arc<Mutex<Vec<String>>>, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind SMTP port");
        let port = listener.local_addr().expect("addr").port();
        let keep = Keep::default();
        let inbox = keep.inbox.clone();
        let greetings = keep.greetings.clone();
        let mut server = mailin_embedded::Server::new(keep);
        // A thread per connection: the client pools connections (lettre keeps idle ones).
        server.with_name("localhost").with_num_threads(32).with_tcp_listener(listener);
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        (format!("smtp://127.0.0.1:{port}"), inbox, greetings)
    }
}

fn email(id: &str, to: &str) -> Email {
    Email {
        message_id: format!("{id}@eventra"),
        from: "Eventra <no-reply@eventra.invalid>".into(),
        to: to.into(),
        subject: format!("Hello {id}"),
        text: format!("Body of {id}.\n"),
    }
}

pub async fn delivers_the_message_as_written(make: Make) {
    let (_g, mailer, inbox) = make();
    mailer.send(&email("one", "Ann <ann@example.com>")).await.unwrap();
    let got = inbox();
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    for needle in ["Message-ID: <one@eventra>", "To: Ann <ann@example.com>", "Subject: Hello one", "Body of one."] {
        assert!(m.contains(needle), "missing {needle:?} in\n{m}");
    }
}

pub async fn refuses_an_invalid_address(make: Make) {
    let (_g, mailer, inbox) = make();
    let err = mailer.send(&email("bad", "not an address")).await.unwrap_err();
    assert!(matches!(err, MailError::Invalid(_)), "{err:?}");
    assert!(inbox().is_empty(), "nothing delivered");
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod file {
            use super::*;
            fn make() -> (Box<dyn std::any::Any + Send>, Arc<dyn Mailer>, Inbox) {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("mail");
                let inbox_dir = path.clone();
                let inbox: Inbox = Arc::new(move || {
                    let Ok(entries) = std::fs::read_dir(&inbox_dir) else { return Vec::new() };
                    entries
                        .flatten()
                        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                        .map(|e| std::fs::read_to_string(e.path()).unwrap())
                        .collect()
                });
                (Box::new(dir), Arc::new(FileMailer::new(path)), inbox)
            }
            $( #[tokio::test] async fn $name() { super::$name(make).await; } )*
        }
        mod smtp {
            use super::*;
            fn make() -> (Box<dyn std::any::Any + Send>, Arc<dyn Mailer>, Inbox) {
                let (url, kept) = smtp_server::start();
                let inbox: Inbox = Arc::new(move || kept.lock().unwrap().clone());
                (Box::new(()), Arc::new(SmtpMailer::from_url(&url).unwrap()), inbox)
            }
            $( #[tokio::test] async fn $name() { super::$name(make).await; } )*
        }
    };
}

conformance!(delivers_the_message_as_written, refuses_an_invalid_address);

/// The file sink keeps one file per message id: a resend replaces it.
#[tokio::test]
async fn file_sink_resend_replaces_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mailer = FileMailer::new(dir.path().to_path_buf());
    mailer.send(&email("same", "a@example.com")).await.unwrap();
    mailer.send(&email("same", "a@example.com")).await.unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].path(), mailer.path_of("same@eventra"));
}

/// Many concurrent sends share the pool's connections: they wait for one instead of
/// each opening (and closing) a connection of its own when none is idle, and sustained
/// sending opens no new ones.
#[tokio::test]
async fn smtp_concurrent_sends_reuse_the_pooled_connections() {
    use std::sync::atomic::Ordering::SeqCst;
    let (url, inbox, greetings) = smtp_server::start_counting();
    let mailer = Arc::new(SmtpMailer::from_url(&url).unwrap());
    let round = |r: usize| {
        let mailer = mailer.clone();
        async move {
            let sends = (0..200).map(|i| {
                let mailer = mailer.clone();
                async move { mailer.send(&email(&format!("r{r}m{i}"), "a@example.com")).await }
            });
            for s in futures_util::future::join_all(sends).await {
                s.unwrap();
            }
        }
    };
    round(1).await;
    let first = greetings.load(SeqCst);
    round(2).await;
    let second = greetings.load(SeqCst) - first;
    assert_eq!(inbox.lock().unwrap().len(), 400);
    assert!(first <= 32, "200 concurrent sends opened {first} SMTP connections");
    assert!(second <= 2, "the second 200 sends opened {second} more connections instead of reusing the {first}");
}

/// An SMTP server that is not there is a transport error (retried), not a refusal.
#[tokio::test]
async fn smtp_unreachable_is_a_transport_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mailer = SmtpMailer::from_url(&format!("smtp://127.0.0.1:{port}")).unwrap();
    let err = mailer.send(&email("x", "a@example.com")).await.unwrap_err();
    assert!(matches!(err, MailError::Transport(_)), "{err:?}");
}
