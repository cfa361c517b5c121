//! Finished jobs kept for exact renders (DESIGN.md §3): a job of a model whose
//! `exact_render` is true keeps its input (a hard link to the client's buffer file, so the
//! client may release its buffer at once) and how it was run, until the client sends
//! `release_job` or disconnects. The engine keeps its own state for the render (PiSA-SR's
//! latents); the kept input lets it start over when that state is gone (a restarted worker).

use std::collections::VecDeque;
use std::fs;
use std::path::Path;

use crate::buffers::ClientId;
use crate::ipc::BufSpec;

/// Per client, the most recent jobs kept; an older one is released when a newer one finishes.
pub const MAX_KEPT_PER_CLIENT: usize = 8;

#[derive(Clone, Debug)]
pub struct KeptJob {
    pub job: u64,
    pub client: ClientId,
    pub plugin: String,
    pub model: String,
    pub scale: u32,
    pub params_json: String,
    /// The kept copy of the input (a hard link in the buffer directory).
    pub input: BufSpec,
}

#[derive(Default)]
pub struct KeptJobs {
    jobs: VecDeque<KeptJob>,
}

impl KeptJobs {
    /// Keeps `job`, linking its input file to `dir`; a failure only means no exact renders.
    pub fn keep(&mut self, mut job: KeptJob, dir: &Path) {
        let path = dir.join(format!("kept-{}.input", job.job));
        let _ = fs::remove_file(&path);
        if let Err(e) = fs::hard_link(&job.input.path, &path).or_else(|_| fs::copy(&job.input.path, &path).map(|_| ())) {
            tracing::warn!(job = job.job, "cannot keep the input for exact renders: {e}");
            return;
        }
        job.input.path = path.display().to_string();
        let client = job.client;
        self.jobs.push_back(job);
        while self.jobs.iter().filter(|j| j.client == client).count() > MAX_KEPT_PER_CLIENT {
            let oldest = self.jobs.iter().find(|j| j.client == client).map(|j| j.job).expect("counted above");
            self.release(client, oldest);
        }
    }

    pub fn get(&self, client: ClientId, job: u64) -> Option<&KeptJob> {
        self.jobs.iter().find(|j| j.client == client && j.job == job)
    }

    /// Forgets a job and deletes its kept input; false if this client has no such job.
    pub fn release(&mut self, client: ClientId, job: u64) -> bool {
        let Some(pos) = self.jobs.iter().position(|j| j.client == client && j.job == job) else { return false };
        let gone = self.jobs.remove(pos).expect("found above");
        let _ = fs::remove_file(&gone.input.path);
        true
    }

    pub fn drop_client(&mut self, client: ClientId) {
        let jobs: Vec<u64> = self.jobs.iter().filter(|j| j.client == client).map(|j| j.job).collect();
        for job in jobs {
            self.release(client, job);
        }
    }

    pub fn clear(&mut self) {
        for j in self.jobs.drain(..) {
            let _ = fs::remove_file(&j.input.path);
        }
    }
}
