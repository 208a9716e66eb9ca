//! The embedded mail sink: each message becomes `<dir>/<message id>.eml`, written to a
//! temporary file and renamed into place, so a reader never sees half a message and a
//! resend of the same message replaces it instead of adding a second file.

use std::path::PathBuf;

use async_trait::async_trait;

use super::{Email, MailError, Mailer};

pub struct FileMailer {
    dir: PathBuf,
}

impl FileMailer {
    pub fn new(dir: PathBuf) -> Self {
        FileMailer { dir }
    }

    /// The file a message id is written to (unsafe characters replaced).
    pub fn path_of(&self, message_id: &str) -> PathBuf {
        let name: String =
            message_id.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.@".contains(c) { c } else { '_' }).collect();
        self.dir.join(format!("{name}.eml"))
    }
}

#[async_trait]
impl Mailer for FileMailer {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn send(&self, email: &Email) -> Result<(), MailError> {
        let bytes = email.to_message()?.formatted();
        let (dir, path) = (self.dir.clone(), self.path_of(&email.message_id));
        let tmp = path.with_extension(format!("eml.{}.tmp", uuid::Uuid::new_v4().simple()));
        // One trip to the blocking pool for the three file operations.
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(|e| MailError::Transport(e.to_string()))?;
        written.map_err(|e| MailError::Transport(format!("{}: {e}", self.dir.display())))
    }
}
