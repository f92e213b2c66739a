//! Slot leases for the limits of DESIGN.md §4: per-user job slots
//! (`LIMITS_JOBS_PER_USER`) and global cluster slots (`LIMITS_MAX_CLUSTERS`).
//!
//! A slot is a *lease*: a member (the job id) of a sorted set whose score is
//! the lease expiry in milliseconds. A holder keeps its lease alive with
//! [`Limiter::renew`] and gives it back with [`Limiter::release`]; a holder that
//! dies simply stops renewing and its slot frees itself when the lease expires,
//! so nothing leaks.
//!
//! Two implementations share the same semantics:
//! - [`RedisLimiter`]: distributed across any number of worker processes. Keys
//!   are `<prefix>:slots:user:<user>` and `<prefix>:slots:clusters`; every
//!   mutation is one Lua script (atomic) that reads the clock from Redis
//!   `TIME`, never from the caller.
//! - [`LocalLimiter`]: in-process, for the embedded single-node mode.
//!
//! [`Limiter`] forwards to either and is what the rest of the code holds.
//!
//! Semantics common to both:
//! - `acquire` is both-or-none: it first drops expired leases, then
//!   * if the job already holds its user slot and its cluster slot, renews them
//!     and returns [`Acquire::Granted`] (a redelivered job re-acquires its own
//!     lease, even if the limits have been lowered meanwhile);
//!   * else if the user set is full (and the job is not in it) → [`Acquire::UserFull`];
//!   * else if the cluster set is full (and the job is not in it) → [`Acquire::ClusterFull`];
//!   * else takes both slots → [`Acquire::Granted`].
//!
//!   A limit of 0 grants nothing new.
//! - `renew` sets the expiry of the job in both sets, *adding* it if absent
//!   (leases are rebuilt this way after a Redis restart: the owner of a running
//!   job keeps renewing even if that puts the set over its limit). It returns
//!   whether the job held both slots before the call.
//! - `release` removes the job from both sets; idempotent. It returns whether
//!   the job held any live slot.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// Outcome of an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// The job holds its user slot and its cluster slot until the lease expires.
    Granted,
    /// The user already has `per_user_limit` live leases; nothing was taken.
    UserFull,
    /// The cluster set already has `cluster_limit` live leases; nothing was taken.
    ClusterFull,
}

impl Acquire {
    pub fn is_granted(self) -> bool {
        self == Acquire::Granted
    }
}

#[derive(thiserror::Error, Debug)]
pub enum LimiterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Longest lease accepted (about 31 years); longer ones are cut to this.
const MAX_TTL_MS: u64 = 1_000_000_000_000;

/// Lease length in whole milliseconds, within 1 ms ..= [`MAX_TTL_MS`].
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS)
}

// ---------------------------------------------------------------------------
// Redis implementation
// ---------------------------------------------------------------------------

/// Helpers shared by all scripts. Numbers handed to Redis go through `%.0f` so
/// they are always plain integers (never `1.7e+12`).
const LUA_PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(n) return string.format('%.0f', n) end
local function purge(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
end
-- The key lives exactly as long as its longest lease, so an abandoned set
-- disappears on its own.
local function tidy(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', key, int(tonumber(last[2])))
  end
end
"#;

/// KEYS: user set, cluster set. ARGV: member, user limit, cluster limit, ttl ms.
/// Returns 0 Granted, 1 UserFull, 2 ClusterFull.
const LUA_ACQUIRE: &str = r#"
local now = now_ms()
local member = ARGV[1]
purge(KEYS[1], now)
purge(KEYS[2], now)
local in_user = redis.call('ZSCORE', KEYS[1], member)
local in_cluster = redis.call('ZSCORE', KEYS[2], member)
if not in_user and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 1
end
if not in_cluster and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return 2
end
local exp = int(now + tonumber(ARGV[4]))
redis.call('ZADD', KEYS[1], exp, member)
redis.call('ZADD', KEYS[2], exp, member)
tidy(KEYS[1])
tidy(KEYS[2])
return 0
"#;

/// KEYS: user set, cluster set. ARGV: member, ttl ms.
/// Returns 1 if the member held both live slots before, else 0.
const LUA_RENEW: &str = r#"
local now = now_ms()
local member = ARGV[1]
purge(KEYS[1], now)
purge(KEYS[2], now)
local present = redis.call('ZSCORE', KEYS[1], member) and redis.call('ZSCORE', KEYS[2], member)
local exp = int(now + tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], exp, member)
redis.call('ZADD', KEYS[2], exp, member)
tidy(KEYS[1])
tidy(KEYS[2])
if present then return 1 else return 0 end
"#;

/// KEYS: user set, cluster set. ARGV: member.
/// Returns the number of live slots removed (0, 1 or 2).
const LUA_RELEASE: &str = r#"
local now = now_ms()
local member = ARGV[1]
purge(KEYS[1], now)
purge(KEYS[2], now)
local n = redis.call('ZREM', KEYS[1], member) + redis.call('ZREM', KEYS[2], member)
tidy(KEYS[1])
tidy(KEYS[2])
return n
"#;

/// KEYS: one set. Returns its live members, soonest expiry first.
const LUA_LIVE: &str = r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. int(now_ms()), '+inf')
"#;

/// KEYS: any number of sets. Returns the total of their live members.
const LUA_COUNT: &str = r#"
local since = '(' .. int(now_ms())
local n = 0
for _, key in ipairs(KEYS) do
  n = n + redis.call('ZCOUNT', key, since, '+inf')
end
return n
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{LUA_PRELUDE}{body}"))
}

// Built once per process; `redis::Script` keeps the SHA and invokes with
// EVALSHA, falling back to loading the script on NOSCRIPT (after a Redis
// restart or SCRIPT FLUSH).
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| script(LUA_ACQUIRE));
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| script(LUA_RENEW));
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| script(LUA_RELEASE));
static LIVE: LazyLock<redis::Script> = LazyLock::new(|| script(LUA_LIVE));
static COUNT: LazyLock<redis::Script> = LazyLock::new(|| script(LUA_COUNT));

/// Escapes the glob characters of `s` for a `SCAN MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Distributed slot leases in Redis. Cheap to clone (the connection manager is
/// shared). It reconnects on its own after a Redis restart: a call that meets
/// the dropped connection is retried once on the new one; while Redis is down,
/// calls fail with [`LimiterError::Redis`] and callers treat that as "no slot
/// now" (acquire) or "try again on the next tick" (renew, release).
#[derive(Debug, Clone)]
pub struct RedisLimiter {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisLimiter {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`) with a
    /// [`ConnectionManager`] and the default timeouts (1 s connect, 500 ms
    /// response).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, LimiterError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self::new(conn, prefix))
    }

    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>:slots:user:<user>`
    pub fn user_key(&self, user: &str) -> String {
        format!("{}:slots:user:{user}", self.prefix)
    }

    /// `<prefix>:slots:clusters`
    pub fn clusters_key(&self) -> String {
        format!("{}:slots:clusters", self.prefix)
    }

    pub async fn acquire(
        &self,
        user: &str,
        job_id: &str,
        per_user_limit: u32,
        cluster_limit: u32,
        ttl: Duration,
    ) -> Result<Acquire, LimiterError> {
        let code: i64 = self
            .invoke(
                ACQUIRE
                    .key(self.user_key(user))
                    .key(self.clusters_key())
                    .arg(job_id)
                    .arg(per_user_limit)
                    .arg(cluster_limit)
                    .arg(ttl_ms(ttl)),
            )
            .await?;
        let outcome = match code {
            0 => Acquire::Granted,
            1 => Acquire::UserFull,
            _ => Acquire::ClusterFull,
        };
        tracing::trace!(user, job_id, ?outcome, "slot acquire");
        Ok(outcome)
    }

    pub async fn renew(
        &self,
        user: &str,
        job_id: &str,
        ttl: Duration,
    ) -> Result<bool, LimiterError> {
        let present: i64 = self
            .invoke(
                RENEW
                    .key(self.user_key(user))
                    .key(self.clusters_key())
                    .arg(job_id)
                    .arg(ttl_ms(ttl)),
            )
            .await?;
        if present == 0 {
            tracing::debug!(user, job_id, "slot lease re-added by renew");
        }
        Ok(present != 0)
    }

    pub async fn release(&self, user: &str, job_id: &str) -> Result<bool, LimiterError> {
        let removed: i64 = self
            .invoke(
                RELEASE
                    .key(self.user_key(user))
                    .key(self.clusters_key())
                    .arg(job_id),
            )
            .await?;
        tracing::trace!(user, job_id, removed, "slot release");
        Ok(removed > 0)
    }

    /// Live job ids holding a slot of `user`, soonest expiry first.
    pub async fn user_slots(&self, user: &str) -> Result<Vec<String>, LimiterError> {
        self.live(self.user_key(user)).await
    }

    /// Live job ids holding a cluster slot, soonest expiry first.
    pub async fn cluster_slots(&self) -> Result<Vec<String>, LimiterError> {
        self.live(self.clusters_key()).await
    }

    async fn live(&self, key: String) -> Result<Vec<String>, LimiterError> {
        self.invoke(&LIVE.key(key)).await
    }

    /// Runs a script, retrying once if the connection turned out to be dead
    /// (Redis restarted, connection killed): the connection manager has
    /// reconnected by then. Every script here is idempotent, so running it a
    /// second time is safe even if the first run reached Redis (only the
    /// `bool` of `release` may then read `false`).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, LimiterError> {
        let mut conn = self.conn.clone();
        match invocation.invoke_async(&mut conn).await {
            Err(e) if e.is_connection_dropped() => {
                tracing::warn!(error = %e, "redis connection dropped, retrying the slot script once");
                Ok(invocation.invoke_async(&mut conn).await?)
            }
            other => Ok(other?),
        }
    }

    /// Number of live leases over all `<prefix>:slots:*` sets (a job holding a
    /// user slot and a cluster slot counts twice). Walks the keys with SCAN.
    pub async fn leases_total(&self) -> Result<usize, LimiterError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}:slots:*", glob_escape(&self.prefix));
        let mut cursor: u64 = 0;
        let mut total: usize = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let mut inv = COUNT.prepare_invoke();
                for key in &keys {
                    inv.key(key);
                }
                let n: usize = inv.invoke_async(&mut conn).await?;
                total += n;
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }
}

// ---------------------------------------------------------------------------
// In-process implementation
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct LocalState {
    /// user -> job id -> lease expiry
    users: HashMap<String, HashMap<String, Instant>>,
    /// job id -> lease expiry
    clusters: HashMap<String, Instant>,
}

impl LocalState {
    /// Drops expired leases, and the maps of users left without any. Cheap:
    /// every user lease has its twin in `clusters`, so the total is about the
    /// cluster limit.
    fn purge_all(&mut self, now: Instant) {
        self.users.retain(|_, set| {
            set.retain(|_, exp| *exp > now);
            !set.is_empty()
        });
        self.clusters.retain(|_, exp| *exp > now);
    }

    fn set_both(&mut self, user: &str, job_id: &str, now: Instant, ttl: Duration) {
        // Instant + 31 years does not overflow on any supported platform.
        let exp = now
            .checked_add(Duration::from_millis(ttl_ms(ttl)))
            .unwrap_or(now);
        self.users
            .entry(user.to_owned())
            .or_default()
            .insert(job_id.to_owned(), exp);
        self.clusters.insert(job_id.to_owned(), exp);
    }
}

/// In-process slot leases for the embedded single-node mode: same methods and
/// semantics as [`RedisLimiter`], clock = [`Instant`]. Clones share the state.
#[derive(Debug, Clone, Default)]
pub struct LocalLimiter {
    state: Arc<Mutex<LocalState>>,
}

impl LocalLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, LocalState> {
        // No invariant spans a panic point inside the critical sections, so a
        // poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn acquire(
        &self,
        user: &str,
        job_id: &str,
        per_user_limit: u32,
        cluster_limit: u32,
        ttl: Duration,
    ) -> Acquire {
        let now = Instant::now();
        let mut st = self.lock();
        st.purge_all(now);
        let (in_user, user_len) = st
            .users
            .get(user)
            .map_or((false, 0), |set| (set.contains_key(job_id), set.len()));
        if !in_user && user_len >= per_user_limit as usize {
            return Acquire::UserFull;
        }
        if !st.clusters.contains_key(job_id) && st.clusters.len() >= cluster_limit as usize {
            return Acquire::ClusterFull;
        }
        st.set_both(user, job_id, now, ttl);
        Acquire::Granted
    }

    pub fn renew(&self, user: &str, job_id: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        st.purge_all(now);
        let present = st
            .users
            .get(user)
            .is_some_and(|set| set.contains_key(job_id))
            && st.clusters.contains_key(job_id);
        st.set_both(user, job_id, now, ttl);
        present
    }

    pub fn release(&self, user: &str, job_id: &str) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        st.purge_all(now);
        let mut removed = st.clusters.remove(job_id).is_some();
        if let Some(set) = st.users.get_mut(user) {
            removed |= set.remove(job_id).is_some();
            if set.is_empty() {
                st.users.remove(user);
            }
        }
        removed
    }

    pub fn user_slots(&self, user: &str) -> Vec<String> {
        let now = Instant::now();
        let st = self.lock();
        st.users
            .get(user)
            .map_or_else(Vec::new, |set| live_sorted(set, now))
    }

    pub fn cluster_slots(&self) -> Vec<String> {
        let now = Instant::now();
        live_sorted(&self.lock().clusters, now)
    }

    pub fn leases_total(&self) -> usize {
        let now = Instant::now();
        let mut st = self.lock();
        st.purge_all(now);
        st.users.values().map(HashMap::len).sum::<usize>() + st.clusters.len()
    }
}

/// Live members, soonest expiry first (the order Redis returns).
fn live_sorted(set: &HashMap<String, Instant>, now: Instant) -> Vec<String> {
    let mut live: Vec<(&String, &Instant)> = set.iter().filter(|(_, exp)| **exp > now).collect();
    live.sort_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.cmp(b.0)));
    live.into_iter().map(|(id, _)| id.clone()).collect()
}

// ---------------------------------------------------------------------------
// The one the rest of the code holds
// ---------------------------------------------------------------------------

/// Slot leases, distributed ([`RedisLimiter`]) or in-process ([`LocalLimiter`]).
/// See the module documentation for the semantics.
#[derive(Debug, Clone)]
pub enum Limiter {
    Redis(RedisLimiter),
    Local(LocalLimiter),
}

impl From<RedisLimiter> for Limiter {
    fn from(l: RedisLimiter) -> Self {
        Limiter::Redis(l)
    }
}

impl From<LocalLimiter> for Limiter {
    fn from(l: LocalLimiter) -> Self {
        Limiter::Local(l)
    }
}

impl Limiter {
    pub async fn redis(url: &str, prefix: &str) -> Result<Self, LimiterError> {
        Ok(Limiter::Redis(RedisLimiter::connect(url, prefix).await?))
    }

    pub fn local() -> Self {
        Limiter::Local(LocalLimiter::new())
    }

    pub async fn acquire(
        &self,
        user: &str,
        job_id: &str,
        per_user_limit: u32,
        cluster_limit: u32,
        ttl: Duration,
    ) -> Result<Acquire, LimiterError> {
        match self {
            Limiter::Redis(l) => {
                l.acquire(user, job_id, per_user_limit, cluster_limit, ttl)
                    .await
            }
            Limiter::Local(l) => Ok(l.acquire(user, job_id, per_user_limit, cluster_limit, ttl)),
        }
    }

    pub async fn renew(
        &self,
        user: &str,
        job_id: &str,
        ttl: Duration,
    ) -> Result<bool, LimiterError> {
        match self {
            Limiter::Redis(l) => l.renew(user, job_id, ttl).await,
            Limiter::Local(l) => Ok(l.renew(user, job_id, ttl)),
        }
    }

    pub async fn release(&self, user: &str, job_id: &str) -> Result<bool, LimiterError> {
        match self {
            Limiter::Redis(l) => l.release(user, job_id).await,
            Limiter::Local(l) => Ok(l.release(user, job_id)),
        }
    }

    pub async fn user_slots(&self, user: &str) -> Result<Vec<String>, LimiterError> {
        match self {
            Limiter::Redis(l) => l.user_slots(user).await,
            Limiter::Local(l) => Ok(l.user_slots(user)),
        }
    }

    pub async fn cluster_slots(&self) -> Result<Vec<String>, LimiterError> {
        match self {
            Limiter::Redis(l) => l.cluster_slots().await,
            Limiter::Local(l) => Ok(l.cluster_slots()),
        }
    }

    pub async fn leases_total(&self) -> Result<usize, LimiterError> {
        match self {
            Limiter::Redis(l) => l.leases_total().await,
            Limiter::Local(l) => Ok(l.leases_total()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escape_escapes_metacharacters() {
        assert_eq!(glob_escape("a*b?[c]\\d"), "a\\*b\\?\\[c\\]\\\\d");
        assert_eq!(glob_escape("plain:prefix"), "plain:prefix");
    }

    #[test]
    fn ttl_is_at_least_one_ms() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 1);
        assert_eq!(ttl_ms(Duration::from_secs(2)), 2000);
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS);
    }
}
