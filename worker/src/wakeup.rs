//! Wakes a queue's apalis worker when a job is inserted into its queue.
//!
//! apalis's `Pubsub` yields one notification per inserted job, and its poll strategy takes at
//! most one notification per fetch. A worker that shares a backlog with others is told of
//! every job but fetches only its share, so stale notifications pile up ahead of new ones and
//! the worker falls back to its polling interval (measured: 500 ms from enqueue to start with
//! three workers, 4 ms with one). `QueueWakeups` takes every notification that is waiting in
//! one poll, so a wake-up is never queued behind old ones, and listens again, after a pause,
//! when its listening connection is lost.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_postgres::Pubsub;
use futures::{Future, Stream, StreamExt};

/// How long to wait before listening again after the listening connection was lost.
const LISTEN_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// A stream that yields `()` whenever one or more jobs were inserted into `queue` since it was
/// last polled.
pub struct QueueWakeups {
    pool: sqlx::PgPool,
    queue: String,
    listener: Pubsub,
    listen_again: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl QueueWakeups {
    pub fn new(pool: sqlx::PgPool, queue: String) -> Self {
        let listener = Pubsub::new(pool.clone(), queue.clone());
        Self {
            pool,
            queue,
            listener,
            listen_again: None,
        }
    }
}

impl Stream for QueueWakeups {
    type Item = ();

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.listen_again.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.listen_again = None;
                this.listener = Pubsub::new(this.pool.clone(), this.queue.clone());
            }
            let mut woken = false;
            loop {
                match this.listener.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(_job))) => woken = true,
                    Poll::Ready(Some(Err(e))) => {
                        tracing::warn!(queue = %this.queue, error = %e, "queue listener failed");
                    }
                    Poll::Ready(None) => {
                        tracing::warn!(queue = %this.queue, retry_in = ?LISTEN_AGAIN_AFTER,
                            "queue listener closed; polling until it listens again");
                        this.listen_again = Some(Box::pin(tokio::time::sleep(LISTEN_AGAIN_AFTER)));
                        // A fetch now finds whatever was inserted while nobody listened.
                        woken = true;
                        break;
                    }
                    // The listener holds our waker for the next notification.
                    Poll::Pending => break,
                }
            }
            if woken {
                return Poll::Ready(Some(()));
            }
            if this.listen_again.is_none() {
                return Poll::Pending;
            }
        }
    }
}
