//! Private instances of the services Eventra depends on, for `eventra chaos` (and the
//! fault tests) to crash and restart without touching anyone else's: a `redis-server`
//! with AOF `appendfsync always` on its own port, a PostgreSQL cluster of its own
//! (`initdb` into a temporary directory), a RabbitMQ node of its own (its own node
//! name, ports and data directory), and an SMTP sink that counts every delivery by
//! `Message-ID`, so a resend is seen (an `.eml` file sink would overwrite it).
//!
//! Each instance is stopped and its directory removed when dropped.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, String>;

/// A TCP port nothing listens on right now.
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| e.to_string())
}

fn wait_listening(port: u16, within: Duration, what: &str) -> Result<()> {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not listen on port {port} within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn temp_dir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

// ---- Redis -------------------------------------------------------------------------

/// A `redis-server` with the production durability setting: every write is in the AOF
/// (fsynced) before Redis answers, so a SIGKILL loses nothing Redis acknowledged.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Whether `redis-server` is installed.
    pub fn available() -> bool {
        Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok()
    }

    pub fn start() -> Result<Self> {
        let mut r = PrivateRedis { port: free_port()?, dir: temp_dir("eventra-redis")?, child: None };
        r.spawn()?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        self.child = Some(child);
        wait_listening(self.port, Duration::from_secs(10), "redis-server")
    }

    /// SIGKILL: a crash, no shutdown save.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory (it replays its AOF).
    pub fn start_again(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- PostgreSQL --------------------------------------------------------------------

/// A PostgreSQL cluster of its own (Debian's server binaries, run as the `postgres`
/// user when this process is root, as PostgreSQL refuses to run as root).
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    running: bool,
}

impl PrivatePostgres {
    /// The server binaries, if installed (`/usr/lib/postgresql/<version>/bin`).
    fn bin_dir() -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
            .collect();
        dirs.sort();
        dirs.pop()
    }

    pub fn available() -> bool {
        Self::bin_dir().is_some()
    }

    fn as_owner(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub fn start() -> Result<Self> {
        let bin = Self::bin_dir().ok_or("PostgreSQL server binaries not found under /usr/lib/postgresql")?;
        let dir = temp_dir("eventra-pg")?;
        let pg = PrivatePostgres { port: free_port()?, dir, bin, running: false };
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&pg.dir), "chown")?;
        }
        run(
            pg.as_owner("initdb")
                .args(["-D"])
                .arg(pg.dir.join("data"))
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
                .stdout(Stdio::null()),
            "initdb",
        )?;
        let mut pg = pg;
        pg.pg_ctl("start")?;
        Ok(pg)
    }

    fn pg_ctl(&mut self, action: &str) -> Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let mut cmd = self.as_owner("pg_ctl");
        cmd.arg("-D").arg(self.dir.join("data")).args(["-w", "-t", "60", "-m", "fast", "-o", &options]);
        cmd.arg("-l").arg(self.dir.join("log")).arg(action).stdout(Stdio::null());
        run(&mut cmd, &format!("pg_ctl {action}"))?;
        self.running = action != "stop";
        Ok(())
    }

    /// The admin URL (database `postgres`).
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of one database of this cluster.
    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A clean restart (`pg_ctl restart -m fast`): connections are cut.
    pub fn restart(&mut self) -> Result<()> {
        self.pg_ctl("restart")
    }

    pub fn stop(&mut self) -> Result<()> {
        self.pg_ctl("stop")
    }

    pub fn start_again(&mut self) -> Result<()> {
        self.pg_ctl("start")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl("stop");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false)
}

// ---- RabbitMQ ----------------------------------------------------------------------

/// A RabbitMQ node of its own: node name, AMQP and distribution ports, data and log
/// directories and an empty plugin list, beside (not instead of) the machine's node.
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: PathBuf,
    running: bool,
}

impl PrivateRabbit {
    pub fn available() -> bool {
        Command::new("sh")
            .args(["-c", "command -v rabbitmq-server && command -v rabbitmqctl"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn start() -> Result<Self> {
        let port = free_port()?;
        let dir = temp_dir("eventra-rabbit")?;
        let node = format!("eventra{port}@localhost");
        std::fs::write(dir.join("rabbitmq.conf"), format!("listeners.tcp.local = 127.0.0.1:{port}\n"))
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").map_err(|e| e.to_string())?;
        if is_root() {
            run(Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(&dir), "chown")?;
        }
        let rabbit = PrivateRabbit { port, node, dir, running: false };
        let mut cmd = rabbit.env(Command::new("rabbitmq-server"));
        cmd.arg("-detached").stdout(Stdio::null()).stderr(Stdio::null());
        run(&mut cmd, "rabbitmq-server -detached")?;
        let mut rabbit = rabbit;
        rabbit.running = true;
        rabbit.await_startup()?;
        Ok(rabbit)
    }

    fn env(&self, mut cmd: Command) -> Command {
        let dist = self.port.wrapping_add(20000).max(1024);
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"));
        cmd
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let mut cmd = Command::new("rabbitmqctl");
        cmd.args(["-n", &self.node]).args(args);
        run(&mut cmd, &format!("rabbitmqctl {}", args.join(" ")))
    }

    fn await_startup(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        // `await_startup` can exit at once before the node registers: retry until it holds.
        while self.ctl(&["await_startup", "--timeout", "60"]).is_err() {
            if Instant::now() > deadline {
                return Err(format!("RabbitMQ node {} did not start", self.node));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        wait_listening(self.port, Duration::from_secs(60), "RabbitMQ")
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `stop_app`: the broker goes away (connections dropped), the node stays.
    pub fn stop_app(&self) -> Result<()> {
        self.ctl(&["stop_app"])
    }

    pub fn start_app(&self) -> Result<()> {
        self.ctl(&["start_app"])?;
        wait_listening(self.port, Duration::from_secs(60), "RabbitMQ")
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if self.running {
            let _ = self.ctl(&["shutdown"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- SMTP sink ---------------------------------------------------------------------

/// Deliveries an [`SmtpSink`] received, by `Message-ID` (a resend counts twice).
pub type Deliveries = Arc<Mutex<HashMap<String, u32>>>;

/// A minimal SMTP server on loopback that accepts every message and counts it.
pub struct SmtpSink {
    pub port: u16,
    pub deliveries: Deliveries,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let deliveries: Deliveries = Arc::default();
        let d = deliveries.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let d = d.clone();
                tokio::spawn(async move {
                    let _ = serve_smtp(socket, d).await;
                });
            }
        });
        Ok(SmtpSink { port, deliveries, task })
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_smtp(socket: tokio::net::TcpStream, deliveries: Deliveries) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 eventra-sink ESMTP\r\n").await?;
    while let Some(line) = lines.next_line().await? {
        let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => write.write_all(b"250-eventra-sink\r\n250 8BITMIME\r\n").await?,
            "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => write.write_all(b"250 OK\r\n").await?,
            "DATA" => {
                write.write_all(b"354 go ahead\r\n").await?;
                let mut id = None;
                while let Some(l) = lines.next_line().await? {
                    if l == "." {
                        break;
                    }
                    if id.is_none() && l.to_ascii_lowercase().starts_with("message-id:") {
                        id = Some(l[11..].trim().trim_matches(|c| c == '<' || c == '>').to_owned());
                    }
                }
                let id = id.unwrap_or_else(|| format!("no-id-{}", uuid::Uuid::now_v7()));
                *deliveries.lock().unwrap_or_else(|e| e.into_inner()).entry(id).or_default() += 1;
                write.write_all(b"250 queued\r\n").await?;
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => write.write_all(b"502 not implemented\r\n").await?,
        }
    }
    Ok(())
}

/// The path of a fresh directory under the system temp dir (removed by the caller).
pub fn scratch_dir(prefix: &str) -> Result<PathBuf> {
    temp_dir(prefix)
}

/// Removes a directory made with [`scratch_dir`].
pub fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}
