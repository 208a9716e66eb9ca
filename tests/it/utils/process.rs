//! The `eventra` binary as a separate OS process: started with a chosen environment,
//! its URL and admin token read from its first two stdout lines, stopped with SIGTERM
//! or SIGKILL, and never left behind when a test fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Every variable a CI shell may export that would steer the server: removed unless the
/// test sets it again.
const SCRUBBED: &[&str] = &[
    "DATABASE_URL",
    "AMQP_URL",
    "REDIS_URL",
    "OPENSEARCH_URL",
    "SMTP_URL",
    "EVENTRA_ADMIN_TOKEN",
    "EVENTRA_DATA_DIR",
    "EVENTRA_ROLES",
    "EVENTRA_NAMESPACE",
    "EVENTRA_LISTEN",
];

pub struct ServerProcess {
    pub base: String,
    pub token: String,
    pub pid: u32,
    child: Option<Child>,
    /// The server's log lines (stderr and stdout after the first two lines).
    log: PathBuf,
}

/// How to start one.
pub struct Spawn<'a> {
    pub dir: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl<'a> Spawn<'a> {
    pub fn new(dir: &'a Path) -> Self {
        Spawn { dir, args: vec!["serve".into(), "--listen".into(), "127.0.0.1:0".into()], env: Vec::new() }
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.to_owned(), v.into()));
        self
    }

    /// Runs the process with its clock shifted by `offset` (libfaketime, e.g. `"+20s"`,
    /// `"-40s"`), as a host with a skewed clock would be; `None` (NOT RUN) without it.
    pub fn skewed_clock(self, offset: &str, test: &str) -> Option<Self> {
        const LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
        if !Path::new(LIB).exists() {
            assert!(!super::in_ci(), "{test}: CI=true but libfaketime is not installed");
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "NOT RUN: {test}: needs libfaketime (Debian package faketime)");
            return None;
        }
        Some(self.env("LD_PRELOAD", LIB).env("FAKETIME", offset).env("FAKETIME_DONT_RESET", "1"))
    }

    /// Starts the process and waits for its URL and token lines.
    pub fn start(self) -> ServerProcess {
        let bin = env!("CARGO_BIN_EXE_eventra");
        let mut cmd = Command::new(bin);
        cmd.args(&self.args).current_dir(self.dir);
        for k in SCRUBBED {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let log = self.dir.join(format!("server-{}.log", uuid::Uuid::now_v7().simple()));
        let err = std::fs::File::create(&log).expect("log file");
        let mut child = cmd.stdout(Stdio::piped()).stderr(err).spawn().expect("spawn eventra");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let mut server =
            ServerProcess { base: String::new(), token: String::new(), pid, child: Some(child), log: log.clone() };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let second = lines.next().and_then(Result::ok);
            let _ = tx.send((first, second));
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&log) {
                for line in lines.map_while(Result::ok) {
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let (url, token) = rx.recv_timeout(Duration::from_secs(60)).unwrap_or((None, None));
        let (Some(url), Some(token)) = (url, token) else {
            let status = server.wait_exit(Duration::from_secs(5));
            panic!("eventra did not start ({status:?}); its log:\n{}", server.log_text());
        };
        server.base = url.strip_prefix("Eventra listening on ").expect("url line").to_owned();
        server.token = token.rsplit(": ").next().unwrap_or_default().to_owned();
        server
    }
}

impl ServerProcess {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([sig, &self.pid.to_string()]).status();
    }

    /// SIGKILL: the process dies mid-whatever.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        self.signal("-TERM");
        self.wait_exit(within)
    }

    /// The exit status if it exits within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
