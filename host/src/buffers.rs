//! Daemon-owned pixel buffers: files in a private directory that clients and the worker map by
//! path. Limits are checked before anything is created, and space is reserved up front
//! (`posix_fallocate`) so a full tmpfs is an error now, not a SIGBUS in the middle of a write.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tessera_protocol::{BufferInfo, ErrorCode, Layout, Limits};

use crate::paths::private_dir;

pub type ClientId = u64;

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    Foreign(String),
    #[error("{0}")]
    Busy(String),
    #[error("cannot create a buffer file: {0}")]
    Io(#[from] io::Error),
}

impl BufferError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BufferError::Limit(_) => ErrorCode::LimitExceeded,
            BufferError::NoSpace(_) => ErrorCode::NoSpace,
            BufferError::Unknown(_) => ErrorCode::UnknownBuffer,
            BufferError::Foreign(_) => ErrorCode::ForeignPath,
            BufferError::Busy(_) => ErrorCode::BufferBusy,
            BufferError::Io(_) => ErrorCode::Internal,
        }
    }
}

pub struct Entry {
    pub info: BufferInfo,
    pub owner: ClientId,
    /// Unfinished jobs reading or writing this buffer.
    pub busy: u32,
}

pub struct BufferStore {
    dir: PathBuf,
    next: u64,
    buffers: HashMap<String, Entry>,
    usage: HashMap<ClientId, Usage>,
}

/// What one client holds.
#[derive(Default, Clone, Copy)]
struct Usage {
    bytes: u64,
    buffers: u32,
}

impl BufferStore {
    /// Takes over `dir`, removing the files a daemon that did not shut down (killed, out of
    /// memory, power loss) left behind: buffers and the inputs of kept jobs. Says in the log
    /// what it removed.
    pub fn new(dir: &Path) -> io::Result<BufferStore> {
        private_dir(dir)?;
        let (mut names, mut bytes) = (Vec::new(), 0u64);
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".buf") || (name.starts_with("kept-") && name.ends_with(".input"));
            if ours {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() {
                    bytes += size;
                    names.push(name);
                }
            }
        }
        if !names.is_empty() {
            names.sort();
            tracing::warn!(
                "removed {} stale file(s), {bytes} bytes, from {}: an earlier tesserad did not shut down ({})",
                names.len(),
                dir.display(),
                names.join(", ")
            );
        }
        Ok(BufferStore { dir: dir.canonicalize()?, next: 1, buffers: HashMap::new(), usage: HashMap::new() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates one buffer per layout for `owner`, all or none. Layouts must already be valid.
    pub fn alloc(&mut self, owner: ClientId, layouts: &[Layout], limits: &Limits) -> Result<Vec<BufferInfo>, BufferError> {
        let wanted: u64 = layouts.iter().map(Layout::byte_len).sum();
        let used = self.usage.get(&owner).copied().unwrap_or_default();
        if used.bytes + wanted > limits.max_client_bytes {
            return Err(BufferError::Limit(format!(
                "this needs {} more bytes of buffers, but the connection already holds {} of its {} byte limit",
                wanted, used.bytes, limits.max_client_bytes
            )));
        }
        if used.buffers as usize + layouts.len() > limits.max_client_buffers as usize {
            return Err(BufferError::Limit(format!(
                "this needs {} more buffers, but the connection already holds {} of its limit of {}: release buffers it no longer needs",
                layouts.len(), used.buffers, limits.max_client_buffers
            )));
        }
        let mut made: Vec<BufferInfo> = Vec::new();
        for layout in layouts {
            match self.create_file(owner, layout) {
                Ok(info) => made.push(info),
                Err(e) => {
                    for info in &made {
                        let _ = fs::remove_file(&info.path);
                    }
                    return Err(e);
                }
            }
        }
        for info in &made {
            let u = self.usage.entry(owner).or_default();
            u.bytes += info.size;
            u.buffers += 1;
            self.buffers.insert(info.id.clone(), Entry { info: info.clone(), owner, busy: 0 });
        }
        Ok(made)
    }

    fn create_file(&mut self, owner: ClientId, layout: &Layout) -> Result<BufferInfo, BufferError> {
        let id = format!("b{}", self.next);
        self.next += 1;
        let path = self.dir.join(format!("c{owner}-{id}.buf"));
        let size = layout.byte_len();
        let file = fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
        // SAFETY: a valid fd and non-negative sizes (layouts are limited well below i64::MAX).
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) };
        let reserved = match rc {
            0 => Ok(()),
            libc::EOPNOTSUPP | libc::EINVAL => file.set_len(size),
            e => Err(io::Error::from_raw_os_error(e)),
        };
        if let Err(e) = reserved {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EFBIG) {
                BufferError::NoSpace(format!(
                    "no room for a {size}-byte buffer in {}: {e}",
                    self.dir.display()
                ))
            } else {
                BufferError::Io(e)
            });
        }
        Ok(BufferInfo { id, path: path.to_string_lossy().into_owned(), size, layout: *layout })
    }

    /// Finds `owner`'s buffer by id or by the exact path `alloc` returned.
    pub fn resolve(&self, owner: ClientId, reference: &str) -> Result<&Entry, BufferError> {
        if reference.contains('/') {
            let path = Path::new(reference);
            // Compare the parent directory after resolving links, so `..` tricks and symlinks
            // out of the buffer directory are caught before any lookup.
            let inside = path
                .parent()
                .and_then(|p| p.canonicalize().ok())
                .is_some_and(|p| p == self.dir);
            let found = self.buffers.values().find(|e| e.owner == owner && Path::new(&e.info.path) == path);
            return match (inside, found) {
                (true, Some(e)) => Ok(e),
                _ => Err(BufferError::Foreign(format!(
                    "{reference} is not one of this connection's buffers in {}",
                    self.dir.display()
                ))),
            };
        }
        match self.buffers.get(reference) {
            Some(e) if e.owner == owner => Ok(e),
            _ => Err(BufferError::Unknown(format!("no buffer `{reference}` on this connection"))),
        }
    }

    pub fn set_busy(&mut self, id: &str, busy: bool) {
        if let Some(e) = self.buffers.get_mut(id) {
            if busy {
                e.busy += 1;
            } else {
                e.busy = e.busy.saturating_sub(1);
            }
        }
    }

    pub fn release(&mut self, owner: ClientId, reference: &str) -> Result<String, BufferError> {
        let entry = self.resolve(owner, reference)?;
        if entry.busy > 0 {
            return Err(BufferError::Busy(format!(
                "buffer `{}` belongs to a job that has not finished",
                entry.info.id
            )));
        }
        let id = entry.info.id.clone();
        self.remove(&id);
        Ok(id)
    }

    /// Deletes a buffer whatever its state (a failed job's outputs, a client that left).
    /// A worker that still maps the file keeps its pages until it unmaps; nobody else sees it.
    pub fn remove(&mut self, id: &str) {
        if let Some(e) = self.buffers.remove(id) {
            let _ = fs::remove_file(&e.info.path);
            if let Some(u) = self.usage.get_mut(&e.owner) {
                u.bytes = u.bytes.saturating_sub(e.info.size);
                u.buffers = u.buffers.saturating_sub(1);
            }
        }
    }

    pub fn drop_client(&mut self, owner: ClientId) {
        let ids: Vec<String> = self.buffers.values().filter(|e| e.owner == owner).map(|e| e.info.id.clone()).collect();
        for id in ids {
            self.remove(&id);
        }
        self.usage.remove(&owner);
    }

    pub fn remove_all(&mut self) {
        let ids: Vec<String> = self.buffers.keys().cloned().collect();
        for id in ids {
            self.remove(&id);
        }
    }
}
