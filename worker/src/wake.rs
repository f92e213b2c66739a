//! Event-driven fetching. apalis-redis announces every push on a pub/sub
//! channel; without listening to it a worker would only look at the queue
//! at its next heartbeat. This subscriber (reconnecting on its own across
//! Redis restarts) turns each announcement into a poll of the queue.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};

/// A stream that yields once per batch of announcements.
#[derive(Clone, Default)]
pub struct WakeSignal(Arc<Inner>);

#[derive(Default)]
struct Inner {
    waker: AtomicWaker,
    set: AtomicBool,
}

impl WakeSignal {
    pub fn signal(&self) {
        self.0.set.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

impl Stream for WakeSignal {
    type Item = ();
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        let inner = &self.0;
        if inner.set.swap(false, Ordering::AcqRel) {
            return Poll::Ready(Some(()));
        }
        inner.waker.register(cx.waker());
        if inner.set.swap(false, Ordering::AcqRel) {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// Listens to `channel` until the process ends, signalling on every message.
pub async fn listen(redis_url: String, channel: String, signal: WakeSignal) {
    loop {
        match subscribe_once(&redis_url, &channel, &signal).await {
            Ok(()) => tracing::debug!("wake-up subscription ended; resubscribing"),
            Err(e) => tracing::debug!(error = %e, "wake-up subscription failed; retrying"),
        }
        // Messages may have been missed meanwhile: look at the queue once.
        signal.signal();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn subscribe_once(
    redis_url: &str,
    channel: &str,
    signal: &WakeSignal,
) -> redis::RedisResult<()> {
    let client = redis::Client::open(redis_url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    signal.signal();
    let mut messages = pubsub.on_message();
    while messages.next().await.is_some() {
        signal.signal();
    }
    Ok(())
}
