//! The dispatch queue: apalis over Redis.
//!
//! A message is only a wake-up naming a job; the database stays the truth.
//! Handlers are idempotent (a job can be delivered twice: orphan recovery,
//! the reconciler's sweep), and the dispatch claim in SQL decides who works.

use std::time::Duration;

use apalis::prelude::TaskSink;
use apalis_redis::{ConnectionManager, RedisStorage};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::config::WorkerTuning;

/// "Look at this job": pushed after a run commits, when a slot frees, and by
/// the reconciler for QUEUED jobs whose wake-up was lost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dispatch {
    pub job_id: Uuid,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Redis(String),
    #[error("the in-process worker has stopped")]
    Closed,
    #[error("queue push timed out")]
    Timeout,
}

pub fn dispatch_queue(prefix: &str) -> String {
    format!("{prefix}:dispatch")
}

/// The apalis-redis configuration shared by producers and consumers. The
/// heartbeat bounds how long a dead worker's task stays in flight
/// (`heartbeat * missed_heartbeats`, CRATES.md trap 6).
pub fn apalis_config(prefix: &str, tuning: &WorkerTuning) -> apalis_redis::Config {
    // apalis-redis 1.0 keeps worker heartbeats in whole seconds and truncates
    // `heartbeat × missed_heartbeats` to seconds: below ~3 s, workers on one
    // queue evict each other as dead every second or so (each then restarts
    // and its in-flight wake-ups are delivered again). Keep the window ≥ 3 s.
    let heartbeat_ms = tuning.heartbeat.as_millis().max(1);
    let min_missed = (3000u128.div_ceil(heartbeat_ms)) as usize;
    apalis_redis::Config::default()
        .queue(dispatch_queue(prefix))
        .heartbeat_interval(tuning.heartbeat)
        .missed_heartbeats(tuning.missed_heartbeats.max(min_missed))
        .batch_size(tuning.concurrency)
}

/// The pub/sub channel apalis-redis announces pushes on; workers listen to
/// it to fetch at once instead of at the next heartbeat.
pub fn available_channel(config: &apalis_redis::Config) -> String {
    format!("tasks:{}:available", config.active_jobs_list())
}

/// Pushes wake-ups. Cheap to clone.
#[derive(Clone)]
pub enum DispatchQueue {
    /// apalis over Redis: any number of worker processes.
    Redis {
        storage: Box<RedisStorage<Dispatch>>,
        push_timeout: Duration,
    },
    /// The embedded gateway's in-process channel. Its durability is the job
    /// table itself: QUEUED jobs are re-woken by the reconciler after a restart.
    Local(mpsc::UnboundedSender<Dispatch>),
}

impl std::fmt::Debug for DispatchQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DispatchQueue::Redis { .. } => "DispatchQueue::Redis",
            DispatchQueue::Local(_) => "DispatchQueue::Local",
        })
    }
}

impl DispatchQueue {
    pub fn new(conn: ConnectionManager, prefix: &str, tuning: &WorkerTuning) -> Self {
        let storage = RedisStorage::new(conn).with_config(apalis_config(prefix, tuning));
        DispatchQueue::Redis {
            storage: Box::new(storage),
            push_timeout: Duration::from_millis(1500),
        }
    }

    /// An in-process queue and the receiving end its worker reads.
    pub fn local() -> (Self, mpsc::UnboundedReceiver<Dispatch>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (DispatchQueue::Local(tx), rx)
    }

    /// Pushes one wake-up per job. Bounded in time so a Redis outage never
    /// holds an HTTP request: the reconciler re-pushes what did not get through.
    pub async fn push(&self, job_ids: &[Uuid]) -> Result<(), QueueError> {
        let (storage, push_timeout) = match self {
            DispatchQueue::Redis {
                storage,
                push_timeout,
            } => (storage, *push_timeout),
            DispatchQueue::Local(tx) => {
                for &job_id in job_ids {
                    tx.send(Dispatch { job_id })
                        .map_err(|_| QueueError::Closed)?;
                }
                return Ok(());
            }
        };
        let mut storage = (**storage).clone();
        let tasks: Vec<Dispatch> = job_ids.iter().map(|&job_id| Dispatch { job_id }).collect();
        let push = async move {
            for task in tasks {
                storage
                    .push(task)
                    .await
                    .map_err(|e| QueueError::Redis(e.to_string()))?;
            }
            // apalis-redis files even immediate pushes as scheduled and then
            // announces nothing: announce them so workers fetch at once
            // rather than at their next heartbeat.
            let channel = available_channel(storage.get_config());
            let mut conn = storage.get_connection().clone();
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(1)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| QueueError::Redis(e.to_string()))?;
            Ok(())
        };
        tokio::time::timeout(push_timeout, push)
            .await
            .map_err(|_| QueueError::Timeout)?
    }
}

/// Drops finished wake-ups from Redis: apalis-redis keeps every acknowledged
/// task (its data, its metadata and its id in the done set) forever.
const VACUUM: &str = r#"
local deleted = 0
for _, id in ipairs(redis.call("SRANDMEMBER", KEYS[3], tonumber(ARGV[1]))) do
  redis.call("HDEL", KEYS[1], id)
  redis.call("HDEL", KEYS[2] .. ":result", id)
  redis.call("DEL", KEYS[2] .. ":" .. id)
  redis.call("SREM", KEYS[3], id)
  deleted = deleted + 1
end
return deleted
"#;

impl DispatchQueue {
    /// Removes up to `batch` finished wake-ups; returns how many.
    pub async fn vacuum(&self, batch: usize) -> Result<usize, QueueError> {
        let DispatchQueue::Redis { storage, .. } = self else {
            return Ok(0);
        };
        let mut storage = (**storage).clone();
        let config = storage.get_config().clone();
        let mut conn = storage.get_connection().clone();
        redis::Script::new(VACUUM)
            .key(config.job_data_hash())
            .key(config.job_meta_hash())
            .key(config.done_jobs_set())
            .arg(batch)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| QueueError::Redis(e.to_string()))
    }
}
