//! The clock behind the body and send timeouts: it runs only while an operation waits
//! on the client, starts over at the next wait after any progress, and costs no timer
//! at all to a client that never keeps the proxy waiting.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

pub struct IdleTimer {
    timeout: Duration,
    /// Made at the first wait, then reset for each later one.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The deadline belongs to the current wait (no progress since it was set).
    armed: bool,
}

impl IdleTimer {
    pub fn new(timeout: Duration) -> IdleTimer {
        IdleTimer {
            timeout,
            sleep: None,
            armed: false,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The operation moved on: the next wait gets a fresh deadline.
    pub fn progress(&mut self) {
        self.armed = false;
    }

    /// The operation is waiting: starts (or goes on with) this wait's deadline and
    /// registers `cx` to be woken at it. True once it has passed.
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            let deadline = tokio::time::Instant::now() + self.timeout;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}
