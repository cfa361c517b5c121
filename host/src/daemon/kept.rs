//! Finished jobs kept for exact renders (DESIGN.md §3): a job of a model whose
//! `exact_render` is true keeps its input (a hard link to the client's buffer file, so the
//! client may release its buffer at once) and how it was run, until `release_job` or until
//! newer jobs push it out. Jobs outlive their connection: editors connect once per job and
//! render the result exactly later, on another connection (the socket is the user's alone;
//! TCP clients hold the token). The engine keeps its own state for the render (PiSA-SR's
//! latents); the kept input lets it start over when that state is gone (a restarted worker).

use std::collections::VecDeque;
use std::fs;
use std::path::Path;

use crate::ipc::BufSpec;

/// The most recent jobs kept; the oldest is released when a newer one finishes. Each costs its
/// input's size on disk here and a few MB of latents in the worker.
pub const MAX_KEPT: usize = 16;

#[derive(Clone, Debug)]
pub struct KeptJob {
    pub job: u64,
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
        self.jobs.push_back(job);
        while self.jobs.len() > MAX_KEPT {
            let oldest = self.jobs.front().map(|j| j.job).expect("over the limit");
            self.release(oldest);
        }
    }

    pub fn get(&self, job: u64) -> Option<&KeptJob> {
        self.jobs.iter().find(|j| j.job == job)
    }

    /// Forgets a job and deletes its kept input; false if there is no such job.
    pub fn release(&mut self, job: u64) -> bool {
        let Some(pos) = self.jobs.iter().position(|j| j.job == job) else { return false };
        let gone = self.jobs.remove(pos).expect("found above");
        let _ = fs::remove_file(&gone.input.path);
        true
    }

    pub fn clear(&mut self) {
        for j in self.jobs.drain(..) {
            let _ = fs::remove_file(&j.input.path);
        }
    }
}
