//! A transfer that both its caller's thread and the runtime drive.
//!
//! An engine starts a pull from its own busy thread and polls it there once
//! per step. Handing the start to a runtime thread costs a wake-up (tens to
//! hundreds of microseconds in a loaded engine process, measured with real
//! vLLM), which is more than a small pull's copies take. So the transfer's
//! future runs on the caller's thread until its first wait (peer looked up,
//! plan made, copies posted), then a runtime task keeps polling it; every
//! poll from the caller steps it too, so completion is seen by whichever
//! comes first. The future is always stepped under one lock, and with the
//! runtime task's waker once that task has run, so a timer or socket it
//! registers from the caller's thread still wakes the task.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use transfer::agent::TransferDone;
use transfer::TransferError;

pub type Outcome = Result<TransferDone, TransferError>;
type Fut = Pin<Box<dyn Future<Output = Outcome> + Send>>;

enum State {
    Running { fut: Fut, task: Option<Waker> },
    Done(Outcome),
}

/// One transfer's future or outcome.
pub struct Run {
    state: Mutex<State>,
    done: Condvar,
}

impl Run {
    /// Polls `fut` once on this thread (the caller must have entered the
    /// runtime); the run and whether it still needs a runtime task.
    pub fn start(fut: impl Future<Output = Outcome> + Send + 'static) -> (Arc<Run>, bool) {
        let run = Arc::new(Run {
            state: Mutex::new(State::Running {
                fut: Box::pin(fut),
                task: None,
            }),
            done: Condvar::new(),
        });
        let pending = !run.step(None);
        (run, pending)
    }

    /// The runtime task that polls the transfer to its end.
    pub fn drive(self: &Arc<Run>) -> impl Future<Output = ()> + Send + 'static {
        Drive(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Polls once unless finished; true once finished. `waker`: the runtime
    /// task's, when it is the one polling; otherwise the last one it left.
    fn step(&self, waker: Option<&Waker>) -> bool {
        let mut st = self.lock();
        let State::Running { fut, task } = &mut *st else {
            return true;
        };
        if let Some(w) = waker {
            if !task.as_ref().is_some_and(|t| t.will_wake(w)) {
                *task = Some(w.clone());
            }
        }
        let w = task.clone().unwrap_or_else(|| Waker::noop().clone());
        match fut.as_mut().poll(&mut Context::from_waker(&w)) {
            Poll::Ready(out) => {
                *st = State::Done(out);
                self.done.notify_all();
                true
            }
            Poll::Pending => false,
        }
    }

    /// Steps the transfer from the caller's thread (inside the runtime's
    /// context) and waits until `deadline` for its outcome; None while it
    /// runs. The outcome is handed out once. A wait of at most [`SPIN_MAX`]
    /// spins, stepping the transfer here, so a copy that lands during it is
    /// seen at once, not after a parked runtime thread wakes (tens to
    /// hundreds of microseconds on an idle host); a longer one sleeps until
    /// the runtime task finishes it.
    pub fn poll_until(&self, deadline: Instant) -> Option<Outcome> {
        if deadline.saturating_duration_since(Instant::now()) <= SPIN_MAX {
            loop {
                if self.step(None) {
                    return self.take();
                }
                if Instant::now() >= deadline {
                    return None;
                }
                std::hint::spin_loop();
            }
        }
        self.step(None);
        let mut st = self.lock();
        loop {
            if let State::Done(_) = &*st {
                drop(st);
                return self.take();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .done
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The outcome of a finished transfer, handed out once.
    fn take(&self) -> Option<Outcome> {
        let mut st = self.lock();
        match std::mem::replace(
            &mut *st,
            State::Done(Err(TransferError::BadRequest(
                "this transfer's outcome was already taken".into(),
            ))),
        ) {
            State::Done(out) => Some(out),
            running => {
                *st = running;
                None
            }
        }
    }
}

/// The longest wait [`Run::poll_until`] spins through.
pub const SPIN_MAX: Duration = Duration::from_millis(2);

struct Drive(Arc<Run>);

impl Future for Drive {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.step(Some(cx.waker())) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn done() -> TransferDone {
        TransferDone {
            bytes: 1,
            descriptors: 1,
            elapsed: Duration::ZERO,
            rehandshake: false,
            backend: transfer::BackendKind::Tcp,
            device_time: None,
            plan_time: Duration::ZERO,
            submit_time: Duration::ZERO,
        }
    }

    #[test]
    fn a_future_ready_at_once_needs_no_task() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        let (run, pending) = Run::start(async { Ok(done()) });
        assert!(!pending);
        let out = run.poll_until(Instant::now()).expect("finished");
        assert_eq!(out.unwrap().bytes, 1);
        // Handed out once.
        assert!(run.poll_until(Instant::now()).unwrap().is_err());
    }

    #[test]
    fn the_first_steps_run_on_the_callers_thread_and_a_timer_wakes_the_task() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let caller = std::thread::current().id();
        let posted_here = Arc::new(AtomicBool::new(false));
        let p = posted_here.clone();
        let (run, pending) = Run::start(async move {
            p.store(std::thread::current().id() == caller, Ordering::SeqCst);
            // A timer registered from the caller's thread must still wake the task.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(done())
        });
        assert!(pending);
        assert!(
            posted_here.load(Ordering::SeqCst),
            "first step not on the caller"
        );
        rt.spawn(run.drive());
        let out = run.poll_until(Instant::now() + Duration::from_secs(10));
        assert_eq!(out.expect("finished in time").unwrap().bytes, 1);
    }

    /// A transfer that is pending for `pending` polls (as a copy not yet
    /// landed), then done; and the count of its polls.
    fn lands_after(
        pending: u32,
    ) -> (
        impl Future<Output = Outcome> + Send + 'static,
        Arc<std::sync::atomic::AtomicU32>,
    ) {
        let polls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let n = polls.clone();
        let fut = std::future::poll_fn(move |_| {
            if n.fetch_add(1, Ordering::SeqCst) < pending {
                Poll::Pending
            } else {
                Poll::Ready(Ok(done()))
            }
        });
        (fut, polls)
    }

    #[test]
    fn a_short_wait_steps_the_transfer_on_the_callers_thread_until_it_lands() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        // Lands at the 50th look, as an event query would; no runtime task runs it,
        // so only the caller's stepping can see it.
        let (fut, polls) = lands_after(50);
        let (run, pending) = Run::start(fut);
        assert!(pending);
        let out = run.poll_until(Instant::now() + SPIN_MAX);
        assert_eq!(out.expect("seen within the wait").unwrap().bytes, 1);
        assert_eq!(polls.load(Ordering::SeqCst), 51);
        // A wait that ends first says so.
        let (run, _) = Run::start(std::future::pending());
        assert!(run
            .poll_until(Instant::now() + Duration::from_micros(200))
            .is_none());
    }

    #[test]
    fn the_callers_poll_alone_can_finish_a_transfer() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        // Pending twice, then done; no task runs it.
        let (fut, polls) = lands_after(2);
        let (run, pending) = Run::start(fut);
        assert!(pending);
        assert!(run.poll_until(Instant::now()).is_none());
        assert!(run.poll_until(Instant::now()).is_some());
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }
}
