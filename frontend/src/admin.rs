//! The admin socket: a Unix stream socket where one line asks and the front end answers,
//! then closes. `status` is answered with the JSON of `Status`.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("another sluice is already answering on {0}")]
    InUse(PathBuf),
    #[error("admin socket {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error(
        "cannot reach sluice at {path}: {cause} (is `sluice run` running, with this admin_socket?)"
    )]
    Connect { path: PathBuf, cause: io::Error },
    #[error("sluice answered: {0}")]
    Refused(String),
    #[error(
        "admin socket {0} names a file that is not a socket; sluice does not remove it (choose \
         another server.admin_socket)"
    )]
    NotASocket(PathBuf),
}

const TIMEOUT: Duration = Duration::from_secs(2);

pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminSocket {
    pub fn bind(path: &Path) -> Result<AdminSocket, AdminError> {
        let io = |cause| AdminError::Io {
            path: path.to_owned(),
            cause,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            // Only a stale socket is replaced: any other file stays where it is.
            if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                return Err(AdminError::NotASocket(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(AdminError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
        Ok(AdminSocket {
            listener,
            path: path.to_owned(),
        })
    }

    /// The listening socket an earlier program of this process bound (an upgrade).
    pub fn from_fd(fd: std::os::fd::OwnedFd, path: &Path) -> Result<AdminSocket, AdminError> {
        let listener = UnixListener::from(fd);
        listener
            .set_nonblocking(true)
            .map_err(|cause| AdminError::Io {
                path: path.to_owned(),
                cause,
            })?;
        Ok(AdminSocket {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    /// Answers every waiting client with `answer(command)`.
    pub fn serve(&self, mut answer: impl FnMut(&str) -> String) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(TIMEOUT));
            let _ = stream.set_write_timeout(Some(TIMEOUT));
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut out = answer(line.trim());
            out.push('\n');
            let _ = (&stream).write_all(out.as_bytes());
        }
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one command and returns the answer.
pub fn ask(path: &Path, command: &str) -> Result<String, AdminError> {
    let mut stream = UnixStream::connect(path).map_err(|cause| AdminError::Connect {
        path: path.to_owned(),
        cause,
    })?;
    let io = |cause| AdminError::Io {
        path: path.to_owned(),
        cause,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(io)?;
    let mut out = String::new();
    stream.read_to_string(&mut out).map_err(io)?;
    if let Some(err) = out.strip_prefix("error: ") {
        return Err(AdminError::Refused(err.trim().to_owned()));
    }
    Ok(out)
}
