//! [`Unconfined`]: an unfiltered thread that runs work a confined thread must hand off.
//!
//! A filter cannot be lifted, and a thread started by a filtered one inherits its filter, so
//! work that needs what no guest-facing thread may do (the `--snapshot-to` save: KVM_GET_*
//! on the VM fd, creating, writing, syncing and renaming files) runs on a thread started
//! before the main thread confines itself. It is a thread of its own, not the teardown
//! thread: that one must stay free to run the emergency teardown while a save is under way
//! (a vCPU caught by seccomp mid-save leaves the save waiting for it forever).
//!
//! [`Unconfined::run`] borrows like `std::thread::scope`: the caller's closure may use its
//! locals, because the call returns only once the closure is gone. (rayon's
//! `ThreadPool::install` does the same; a thread pool crate for one job per run is more
//! than this needs.)

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;
type Outcome = Result<(), Box<dyn Any + Send>>;

/// The thread, or nothing when the filters are off (then jobs run on the caller).
pub struct Unconfined {
    worker: Option<Worker>,
}

struct Worker {
    /// A rendezvous channel: a send returns once the thread holds the job (or gives the job
    /// back when the thread is gone), so the job is never left in the channel.
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Outcome>,
    thread: Option<JoinHandle<()>>,
}

impl Unconfined {
    /// Starts the thread `name` if `needed` and the filters are on ([`super::enable`]);
    /// otherwise jobs run on the caller. Call from an unfiltered thread.
    pub fn spawn(name: &str, needed: bool) -> std::io::Result<Unconfined> {
        let worker = if needed && super::enabled() { Some(Worker::start(name)?) } else { None };
        Ok(Unconfined { worker })
    }

    /// Runs `f` on the unfiltered thread (or here, without one) and returns its result. A
    /// panic in `f` is resumed here (though microvm's panic hook ends the process first).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let Some(worker) = &self.worker else {
            return f();
        };
        let mut result = None;
        let slot = &mut result;
        let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || *slot = Some(f()));
        // SAFETY: only the lifetime changes. The job borrows from this frame (`result`, and
        // what `f` borrows, which outlives the call). It leaves this frame only through the
        // rendezvous send, which either hands it to the thread or gives it back (dropped
        // here). Once the thread has it, this function returns only after `done` answers,
        // which the thread does after the job was consumed (run, or dropped by an unwind
        // caught there), or by dropping its sender, which it declared before the job's
        // variable so the job is dropped first. So the job never outlives what it borrows.
        // `Unconfined` is not `Sync` (`Receiver`), so no two calls wait on `done` at once.
        let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
        let sent = worker.jobs.as_ref().map(|jobs| jobs.send(job));
        let outcome = match sent {
            Some(Ok(())) => worker.done.recv(),
            // The thread is gone; the job came back and is dropped here.
            Some(Err(_)) | None => panic!("the unconfined thread is gone"),
        };
        match outcome {
            Ok(Ok(())) => result.expect("the job ran to its end"),
            Ok(Err(payload)) => panic::resume_unwind(payload),
            Err(_) => panic!("the unconfined thread ended while running a job"),
        }
    }
}

impl Worker {
    fn start(name: &str) -> std::io::Result<Worker> {
        let (jobs, incoming) = mpsc::sync_channel::<Job>(0);
        let (finished, done) = mpsc::sync_channel::<Outcome>(1);
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            // Declared in this order so that, should this thread ever unwind, a job it holds
            // is dropped before `finished` (whose drop is what wakes a waiting caller).
            let finished = finished;
            let incoming = incoming;
            for job in incoming.iter() {
                // The job is consumed (run, or dropped while unwinding) before this returns.
                let outcome = panic::catch_unwind(AssertUnwindSafe(job));
                if finished.send(outcome).is_err() {
                    break;
                }
            }
        })?;
        Ok(Worker { jobs: Some(jobs), done, thread: Some(thread) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As `spawn` with the filters on, without turning them on in the test process.
    fn worker() -> Unconfined {
        Unconfined { worker: Some(Worker::start("test-unconfined").unwrap()) }
    }

    #[test]
    fn runs_borrowing_jobs_on_its_thread() {
        let u = worker();
        let here = std::thread::current().id();
        let mut counted = 0;
        let words = ["a".to_string(), "bc".into()];
        let (len, there) = u.run(|| {
            counted += 1;
            (words.iter().map(String::len).sum::<usize>(), std::thread::current().id())
        });
        assert_eq!((len, counted), (3, 1));
        assert_ne!(there, here, "ran on the worker");
        assert_eq!(u.run(|| 7), 7, "more than one job");
        let inline = Unconfined::spawn("unused", false).unwrap();
        assert_eq!(inline.run(|| std::thread::current().id()), here, "without a thread: on the caller");
    }

    #[test]
    fn a_panicking_job_panics_the_caller() {
        let u = worker();
        let caught = panic::catch_unwind(AssertUnwindSafe(|| u.run(|| panic!("job failed"))));
        assert_eq!(caught.unwrap_err().downcast_ref::<&str>(), Some(&"job failed"));
        assert_eq!(u.run(|| 1), 1, "the thread survives");
    }
}
