//! Slot limiter tests. Every case runs against the real Redis
//! (`GATEWAY_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`) and against the
//! in-process limiter. Each Redis test uses its own random key prefix and
//! deletes its keys at the end (keys left by a failed test expire by
//! themselves: the limiter keeps their PEXPIRE at the longest lease).
//!
//! Throughput of the concurrency tests is printed; see it with
//! `cargo test -p gateway-shared --test limiter -- --nocapture`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use shared::limiter::{Acquire, Limiter, LimiterError, LocalLimiter, RedisLimiter};

const LONG: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(300);

fn redis_url() -> String {
    std::env::var("GATEWAY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn random_prefix() -> String {
    format!("test:limiter:{}", uuid::Uuid::new_v4().simple())
}

async fn raw_conn() -> MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis")
}

async fn keys_matching(conn: &mut MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        out.extend(keys);
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// Deletes every key under `prefix` (the test prefixes have no glob characters).
async fn delete_prefix(conn: &mut MultiplexedConnection, prefix: &str) {
    let keys = keys_matching(conn, &format!("{prefix}:*")).await;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(conn)
            .await
            .unwrap();
    }
}

/// One limiter under test plus what a case needs around it.
struct Env {
    lim: Limiter,
    redis: Option<(String, MultiplexedConnection)>,
}

impl Env {
    async fn redis() -> Env {
        let prefix = random_prefix();
        let lim = RedisLimiter::connect(&redis_url(), &prefix)
            .await
            .expect("connect the limiter to the test Redis");
        Env {
            lim: lim.into(),
            redis: Some((prefix, raw_conn().await)),
        }
    }

    fn local() -> Env {
        Env {
            lim: Limiter::local(),
            redis: None,
        }
    }

    /// Another handle on the same slots: its own connection for Redis, a
    /// clone for the in-process limiter.
    async fn another(&self) -> Limiter {
        match &self.redis {
            Some((prefix, _)) => RedisLimiter::connect(&redis_url(), prefix)
                .await
                .unwrap()
                .into(),
            None => self.lim.clone(),
        }
    }

    /// Loses every lease, as a Redis restart without persistence would (for
    /// the in-process limiter: a process restart).
    async fn wipe(&mut self) {
        match &mut self.redis {
            Some((prefix, conn)) => delete_prefix(conn, prefix).await,
            None => self.lim = Limiter::local(),
        }
    }

    async fn cleanup(mut self) {
        self.wipe().await;
    }
}

/// Runs each case once on Redis and once in-process.
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let mut env = super::Env::redis().await;
                    super::$case(&mut env).await.unwrap();
                    env.cleanup().await;
                }
            )*
        }
        mod on_local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let mut env = super::Env::local();
                    super::$case(&mut env).await.unwrap();
                    env.cleanup().await;
                }
            )*
        }
    };
}

on_both!(
    grants_up_to_the_limits,
    user_full_is_reported_before_cluster_full,
    refusal_takes_nothing,
    zero_limits_grant_nothing,
    reacquire_is_idempotent,
    release_frees_and_is_idempotent,
    expiry_frees_a_dead_holders_slot,
    renew_keeps_a_lease_alive,
    renew_readds_after_the_leases_are_lost,
    concurrent_holders_never_exceed_the_user_limit,
    concurrent_holders_never_exceed_the_cluster_limit,
);

type R = Result<(), LimiterError>;

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

async fn grants_up_to_the_limits(env: &mut Env) -> R {
    let l = &env.lim;
    // per user 2, clusters 3
    assert_eq!(
        l.acquire("alice", "j1", 2, 3, LONG).await?,
        Acquire::Granted
    );
    assert_eq!(
        l.acquire("alice", "j2", 2, 3, LONG).await?,
        Acquire::Granted
    );
    assert_eq!(
        l.acquire("alice", "j3", 2, 3, LONG).await?,
        Acquire::UserFull
    );
    assert_eq!(l.acquire("bob", "j4", 2, 3, LONG).await?, Acquire::Granted);
    assert_eq!(
        l.acquire("bob", "j5", 2, 3, LONG).await?,
        Acquire::ClusterFull
    );
    assert_eq!(
        l.acquire("carol", "j6", 2, 3, LONG).await?,
        Acquire::ClusterFull
    );

    assert_eq!(sorted(l.user_slots("alice").await?), ["j1", "j2"]);
    assert_eq!(l.user_slots("bob").await?, ["j4"]);
    assert!(l.user_slots("carol").await?.is_empty());
    assert_eq!(sorted(l.cluster_slots().await?), ["j1", "j2", "j4"]);
    assert_eq!(l.leases_total().await?, 6);

    for (user, job) in [("alice", "j1"), ("alice", "j2"), ("bob", "j4")] {
        assert!(l.release(user, job).await?);
    }
    assert_eq!(l.leases_total().await?, 0);
    assert!(l.cluster_slots().await?.is_empty());
    Ok(())
}

async fn user_full_is_reported_before_cluster_full(env: &mut Env) -> R {
    let l = &env.lim;
    assert_eq!(
        l.acquire("alice", "j1", 1, 1, LONG).await?,
        Acquire::Granted
    );
    // Both sets are full for alice: the user limit is reported.
    assert_eq!(
        l.acquire("alice", "j2", 1, 1, LONG).await?,
        Acquire::UserFull
    );
    // Only the cluster set is full for bob.
    assert_eq!(
        l.acquire("bob", "j3", 1, 1, LONG).await?,
        Acquire::ClusterFull
    );
    // A roomier cluster limit lets bob in, alice is still capped by her own.
    assert_eq!(
        l.acquire("alice", "j2", 1, 5, LONG).await?,
        Acquire::UserFull
    );
    assert_eq!(l.acquire("bob", "j3", 1, 5, LONG).await?, Acquire::Granted);
    l.release("alice", "j1").await?;
    l.release("bob", "j3").await?;
    assert_eq!(l.leases_total().await?, 0);
    Ok(())
}

async fn refusal_takes_nothing(env: &mut Env) -> R {
    let l = &env.lim;
    assert_eq!(
        l.acquire("alice", "j1", 5, 1, LONG).await?,
        Acquire::Granted
    );
    // bob's user slot is free, the cluster slot is not: both-or-none.
    assert_eq!(
        l.acquire("bob", "j2", 5, 1, LONG).await?,
        Acquire::ClusterFull
    );
    assert!(l.user_slots("bob").await?.is_empty());
    // alice's user set is full: the free cluster slot is not taken either.
    assert_eq!(
        l.acquire("carol", "j3", 1, 9, LONG).await?,
        Acquire::Granted
    );
    assert_eq!(
        l.acquire("carol", "j4", 1, 9, LONG).await?,
        Acquire::UserFull
    );
    assert_eq!(sorted(l.cluster_slots().await?), ["j1", "j3"]);
    assert_eq!(l.leases_total().await?, 4);
    l.release("alice", "j1").await?;
    l.release("carol", "j3").await?;
    assert_eq!(l.leases_total().await?, 0);
    Ok(())
}

async fn zero_limits_grant_nothing(env: &mut Env) -> R {
    let l = &env.lim;
    assert_eq!(
        l.acquire("alice", "j1", 0, 10, LONG).await?,
        Acquire::UserFull
    );
    assert_eq!(
        l.acquire("alice", "j1", 10, 0, LONG).await?,
        Acquire::ClusterFull
    );
    assert_eq!(
        l.acquire("alice", "j1", 0, 0, LONG).await?,
        Acquire::UserFull
    );
    assert_eq!(l.leases_total().await?, 0);
    Ok(())
}

async fn reacquire_is_idempotent(env: &mut Env) -> R {
    let l = &env.lim;
    assert_eq!(
        l.acquire("alice", "j1", 1, 1, SHORT).await?,
        Acquire::Granted
    );
    // A redelivered job gets its own lease back although both sets are full,
    // and the re-acquire renews it.
    assert_eq!(
        l.acquire("alice", "j1", 1, 1, LONG).await?,
        Acquire::Granted
    );
    assert_eq!(
        l.acquire("alice", "j1", 1, 1, LONG).await?,
        Acquire::Granted
    );
    assert_eq!(l.user_slots("alice").await?, ["j1"]);
    assert_eq!(l.cluster_slots().await?, ["j1"]);
    assert_eq!(l.leases_total().await?, 2);
    tokio::time::sleep(SHORT + Duration::from_millis(150)).await;
    assert_eq!(
        l.user_slots("alice").await?,
        ["j1"],
        "re-acquire renewed the lease"
    );
    assert_eq!(
        l.acquire("alice", "j2", 1, 1, LONG).await?,
        Acquire::UserFull
    );
    // Limits lowered under a holder (here to 0): the holder keeps its lease.
    assert_eq!(
        l.acquire("alice", "j1", 0, 0, LONG).await?,
        Acquire::Granted
    );
    assert!(l.release("alice", "j1").await?);
    assert_eq!(l.leases_total().await?, 0);
    Ok(())
}

async fn release_frees_and_is_idempotent(env: &mut Env) -> R {
    let l = &env.lim;
    assert_eq!(
        l.acquire("alice", "j1", 1, 1, LONG).await?,
        Acquire::Granted
    );
    assert_eq!(
        l.acquire("alice", "j2", 1, 1, LONG).await?,
        Acquire::UserFull
    );
    assert!(l.release("alice", "j1").await?);
    assert!(
        !l.release("alice", "j1").await?,
        "second release is a no-op"
    );
    assert!(!l.release("nobody", "never-held").await?);
    assert_eq!(l.leases_total().await?, 0);
    assert_eq!(
        l.acquire("alice", "j2", 1, 1, LONG).await?,
        Acquire::Granted
    );
    assert!(l.release("alice", "j2").await?);
    assert_eq!(l.leases_total().await?, 0);
    Ok(())
}

async fn expiry_frees_a_dead_holders_slot(env: &mut Env) -> R {
    let l = &env.lim;
    // The holder "dies" right after acquiring: it never renews nor releases.
    assert_eq!(
        l.acquire("alice", "dead", 1, 1, SHORT).await?,
        Acquire::Granted
    );
    assert_eq!(
        l.acquire("alice", "j2", 1, 1, LONG).await?,
        Acquire::UserFull
    );
    assert_eq!(
        l.acquire("bob", "j3", 1, 1, LONG).await?,
        Acquire::ClusterFull
    );
    tokio::time::sleep(SHORT + Duration::from_millis(150)).await;
    // Inspection shows live leases only, even before anything purged them.
    assert!(l.user_slots("alice").await?.is_empty());
    assert!(l.cluster_slots().await?.is_empty());
    assert_eq!(l.leases_total().await?, 0);
    assert_eq!(l.acquire("bob", "j3", 1, 1, LONG).await?, Acquire::Granted);
    assert!(
        !l.release("alice", "dead").await?,
        "the expired lease is gone"
    );
    assert!(l.release("bob", "j3").await?);
    assert_eq!(l.leases_total().await?, 0);
    Ok(())
}

async fn renew_keeps_a_lease_alive(env: &mut Env) -> R {
    let l = &env.lim;
    assert_eq!(
        l.acquire("alice", "j1", 1, 1, SHORT).await?,
        Acquire::Granted
    );
    for _ in 0..6 {
        tokio::time::sleep(SHORT / 3).await;
        assert!(l.renew("alice", "j1", SHORT).await?);
    }
    // 600 ms after a 300 ms acquire: alive thanks to the renewals.
    assert_eq!(l.user_slots("alice").await?, ["j1"]);
    assert_eq!(
        l.acquire("alice", "j2", 1, 1, LONG).await?,
        Acquire::UserFull
    );
    tokio::time::sleep(SHORT + Duration::from_millis(150)).await;
    assert_eq!(l.leases_total().await?, 0);
    // Renewing an expired lease re-adds it and says it was not there.
    assert!(!l.renew("alice", "j1", LONG).await?);
    assert!(l.release("alice", "j1").await?);
    Ok(())
}

async fn renew_readds_after_the_leases_are_lost(env: &mut Env) -> R {
    assert_eq!(
        env.lim.acquire("alice", "j1", 1, 5, LONG).await?,
        Acquire::Granted
    );
    env.wipe().await; // Redis restarted empty
    let l = &env.lim;
    assert_eq!(l.leases_total().await?, 0);
    // The owner of the running job keeps renewing: the lease comes back.
    assert!(!l.renew("alice", "j1", LONG).await?);
    assert!(l.renew("alice", "j1", LONG).await?);
    assert_eq!(l.user_slots("alice").await?, ["j1"]);
    assert_eq!(l.cluster_slots().await?, ["j1"]);
    assert_eq!(
        l.acquire("alice", "j2", 1, 5, LONG).await?,
        Acquire::UserFull
    );
    // Rebuilding from the database may put a set over its limit (two jobs
    // were running; the limit has since been lowered): renew still adds.
    assert!(!l.renew("alice", "j9", LONG).await?);
    assert_eq!(sorted(l.user_slots("alice").await?), ["j1", "j9"]);
    assert_eq!(
        l.acquire("alice", "j2", 1, 5, LONG).await?,
        Acquire::UserFull
    );
    assert!(l.release("alice", "j1").await?);
    assert_eq!(
        l.acquire("alice", "j2", 1, 5, LONG).await?,
        Acquire::UserFull,
        "j9 still over"
    );
    assert!(l.release("alice", "j9").await?);
    assert_eq!(
        l.acquire("alice", "j2", 1, 5, LONG).await?,
        Acquire::Granted
    );
    assert!(l.release("alice", "j2").await?);
    assert_eq!(l.leases_total().await?, 0);
    Ok(())
}

const TASKS: usize = 8;
const HAMMER_FOR: Duration = Duration::from_secs(2);

fn fetch_max(max: &AtomicUsize, v: usize) {
    max.fetch_max(v, Ordering::SeqCst);
}

async fn concurrent_holders_never_exceed_the_user_limit(env: &mut Env) -> R {
    const LIMIT: u32 = 2;
    let holders = Arc::new(AtomicUsize::new(0));
    let max_holders = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let l = env.another().await;
        let (holders, max_holders) = (holders.clone(), max_holders.clone());
        tasks.push(tokio::spawn(async move {
            let (mut pairs, mut refused) = (0u64, 0u64);
            let start = Instant::now();
            let mut i = 0u64;
            while start.elapsed() < HAMMER_FOR {
                i += 1;
                let job = format!("t{t}-{i}");
                match l.acquire("alice", &job, LIMIT, 1000, LONG).await? {
                    Acquire::Granted => {
                        let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                        fetch_max(&max_holders, now);
                        tokio::task::yield_now().await;
                        holders.fetch_sub(1, Ordering::SeqCst);
                        assert!(l.release("alice", &job).await?);
                        pairs += 1;
                    }
                    Acquire::UserFull => {
                        refused += 1;
                        // The in-process limiter never suspends: let the
                        // holders run instead of spinning on the threads.
                        tokio::task::yield_now().await;
                    }
                    Acquire::ClusterFull => panic!("cluster limit is not the constraint here"),
                }
            }
            Ok::<_, LimiterError>((pairs, refused))
        }));
    }
    let (pairs, refused) = join_counts(tasks).await?;
    let max = max_holders.load(Ordering::SeqCst);
    report("user limit", &env.lim, pairs, refused, max);
    assert!(
        max <= LIMIT as usize,
        "{max} concurrent holders, limit {LIMIT}"
    );
    assert!(pairs > 0);
    assert_eq!(env.lim.leases_total().await?, 0);
    Ok(())
}

async fn concurrent_holders_never_exceed_the_cluster_limit(env: &mut Env) -> R {
    const USERS: usize = 6;
    const PER_USER: u32 = 2;
    const CLUSTERS: u32 = 3;
    let holders = Arc::new(AtomicUsize::new(0));
    let max_holders = Arc::new(AtomicUsize::new(0));
    let per_user: Arc<Vec<(AtomicUsize, AtomicUsize)>> = Arc::new(
        (0..USERS)
            .map(|_| (AtomicUsize::new(0), AtomicUsize::new(0)))
            .collect(),
    );
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let l = env.another().await;
        let (holders, max_holders, per_user) =
            (holders.clone(), max_holders.clone(), per_user.clone());
        tasks.push(tokio::spawn(async move {
            let (mut pairs, mut refused) = (0u64, 0u64);
            let start = Instant::now();
            let mut i = 0u64;
            while start.elapsed() < HAMMER_FOR {
                i += 1;
                let u = (t + i as usize) % USERS;
                let user = format!("user{u}");
                let job = format!("t{t}-{i}");
                match l.acquire(&user, &job, PER_USER, CLUSTERS, LONG).await? {
                    Acquire::Granted => {
                        let (uh, umax) = &per_user[u];
                        fetch_max(umax, uh.fetch_add(1, Ordering::SeqCst) + 1);
                        fetch_max(&max_holders, holders.fetch_add(1, Ordering::SeqCst) + 1);
                        tokio::task::yield_now().await;
                        holders.fetch_sub(1, Ordering::SeqCst);
                        uh.fetch_sub(1, Ordering::SeqCst);
                        assert!(l.release(&user, &job).await?);
                        pairs += 1;
                    }
                    Acquire::UserFull | Acquire::ClusterFull => {
                        refused += 1;
                        tokio::task::yield_now().await;
                    }
                }
            }
            Ok::<_, LimiterError>((pairs, refused))
        }));
    }
    let (pairs, refused) = join_counts(tasks).await?;
    let max = max_holders.load(Ordering::SeqCst);
    report("cluster limit", &env.lim, pairs, refused, max);
    assert!(
        max <= CLUSTERS as usize,
        "{max} concurrent cluster holders, limit {CLUSTERS}"
    );
    for (u, (_, umax)) in per_user.iter().enumerate() {
        let umax = umax.load(Ordering::SeqCst);
        assert!(
            umax <= PER_USER as usize,
            "user{u}: {umax} holders, limit {PER_USER}"
        );
    }
    assert!(pairs > 0);
    assert_eq!(env.lim.leases_total().await?, 0);
    Ok(())
}

async fn join_counts(
    tasks: Vec<tokio::task::JoinHandle<Result<(u64, u64), LimiterError>>>,
) -> Result<(u64, u64), LimiterError> {
    let (mut pairs, mut refused) = (0, 0);
    for t in tasks {
        let (p, r) = t.await.expect("task panicked")?;
        pairs += p;
        refused += r;
    }
    Ok((pairs, refused))
}

fn report(what: &str, l: &Limiter, pairs: u64, refused: u64, max: usize) {
    let kind = match l {
        Limiter::Redis(_) => "redis",
        Limiter::Local(_) => "local",
    };
    let secs = HAMMER_FOR.as_secs_f64();
    println!(
        "[{kind}] {what}: {TASKS} tasks, {pairs} acquire+release pairs ({:.0}/s), \
         {refused} refusals ({:.0}/s), max concurrent holders {max}",
        pairs as f64 / secs,
        refused as f64 / secs,
    );
}

// ---------------------------------------------------------------------------
// Redis-only checks: key layout, key TTLs, SCAN prefix isolation
// ---------------------------------------------------------------------------

async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test]
async fn redis_key_layout_and_key_ttls() {
    let prefix = random_prefix();
    let l = RedisLimiter::connect(&redis_url(), &prefix).await.unwrap();
    let mut conn = raw_conn().await;
    let user_key = format!("{prefix}:slots:user:alice");
    let clusters_key = format!("{prefix}:slots:clusters");
    assert_eq!(l.user_key("alice"), user_key);
    assert_eq!(l.clusters_key(), clusters_key);

    assert_eq!(
        l.acquire("alice", "j1", 5, 5, Duration::from_secs(10))
            .await
            .unwrap(),
        Acquire::Granted
    );
    assert_eq!(
        l.acquire("alice", "j2", 5, 5, Duration::from_secs(2))
            .await
            .unwrap(),
        Acquire::Granted
    );
    let mut keys = keys_matching(&mut conn, &format!("{prefix}:*")).await;
    keys.sort();
    assert_eq!(keys, [clusters_key.clone(), user_key.clone()]);
    // Members are the job ids, scores the expiry in ms from the Redis clock.
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let score: f64 = redis::cmd("ZSCORE")
        .arg(&user_key)
        .arg("j1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ahead = score as i64 - now_ms;
    assert!(
        (9_000..=10_000).contains(&ahead),
        "j1 expires {ahead} ms ahead"
    );

    // Each key lives as long as its longest lease.
    for key in [&user_key, &clusters_key] {
        let t = pttl(&mut conn, key).await;
        assert!((9_000..=10_000).contains(&t), "{key}: pttl {t}");
    }
    l.release("alice", "j1").await.unwrap();
    for key in [&user_key, &clusters_key] {
        let t = pttl(&mut conn, key).await;
        assert!(
            (0..=2_000).contains(&t),
            "{key}: pttl {t} after the longest lease left"
        );
    }
    // Abandoned: nobody touches the limiter again, the keys vanish on their own.
    l.renew("alice", "j2", SHORT).await.unwrap();
    tokio::time::sleep(SHORT + Duration::from_millis(150)).await;
    assert!(
        keys_matching(&mut conn, &format!("{prefix}:*"))
            .await
            .is_empty()
    );

    // Empty sets disappear on release.
    l.acquire("alice", "j3", 5, 5, LONG).await.unwrap();
    l.release("alice", "j3").await.unwrap();
    assert!(
        keys_matching(&mut conn, &format!("{prefix}:*"))
            .await
            .is_empty()
    );
    delete_prefix(&mut conn, &prefix).await;
}

#[tokio::test]
async fn redis_leases_total_stays_inside_its_prefix() {
    let base = random_prefix();
    // A prefix with glob characters must not match its neighbours in SCAN.
    let globby = RedisLimiter::connect(&redis_url(), &format!("{base}-*"))
        .await
        .unwrap();
    let other = RedisLimiter::connect(&redis_url(), &format!("{base}-x"))
        .await
        .unwrap();
    let longer = RedisLimiter::connect(&redis_url(), &format!("{base}-*x"))
        .await
        .unwrap();
    assert_eq!(
        other.acquire("alice", "j1", 5, 5, LONG).await.unwrap(),
        Acquire::Granted
    );
    assert_eq!(
        longer.acquire("alice", "j1", 5, 5, LONG).await.unwrap(),
        Acquire::Granted
    );
    assert_eq!(globby.leases_total().await.unwrap(), 0);
    assert_eq!(
        globby.acquire("bob", "j2", 5, 5, LONG).await.unwrap(),
        Acquire::Granted
    );
    assert_eq!(globby.leases_total().await.unwrap(), 2);
    assert_eq!(other.leases_total().await.unwrap(), 2);
    for l in [&globby, &other, &longer] {
        l.release("alice", "j1").await.unwrap();
        l.release("bob", "j2").await.unwrap();
        assert_eq!(l.leases_total().await.unwrap(), 0);
    }
    let mut conn = raw_conn().await;
    delete_prefix(&mut conn, &base).await; // `{base}:*` does not cover `{base}-…`
    for p in ["-x", "-\\*", "-\\*x"] {
        delete_prefix(&mut conn, &format!("{base}{p}")).await;
    }
    assert!(
        keys_matching(&mut conn, &format!("{base}*"))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn local_limiter_is_usable_directly() {
    let l = LocalLimiter::new();
    assert_eq!(l.acquire("alice", "j1", 1, 1, LONG), Acquire::Granted);
    assert!(Acquire::Granted.is_granted());
    assert!(
        !l.clone().acquire("alice", "j2", 1, 1, LONG).is_granted(),
        "clones share state"
    );
    assert!(l.release("alice", "j1"));
    assert_eq!(l.leases_total(), 0);
}

#[tokio::test]
async fn redis_limiter_reconnects_after_its_connection_dies() {
    let prefix = random_prefix();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut cm = redis::aio::ConnectionManager::new(client).await.unwrap();
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut cm)
        .await
        .unwrap();
    let l = RedisLimiter::new(cm, prefix.as_str());
    assert_eq!(
        l.acquire("alice", "j1", 1, 1, LONG).await.unwrap(),
        Acquire::Granted
    );

    // What a Redis restart does to us: the server drops the connection.
    let mut conn = raw_conn().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1);

    // The call that meets the dead connection is retried on the new one.
    let renewed = l
        .renew("alice", "j1", LONG)
        .await
        .expect("renew across a reconnect");
    assert!(renewed);
    assert!(l.release("alice", "j1").await.unwrap());
    assert_eq!(l.leases_total().await.unwrap(), 0);
    delete_prefix(&mut conn, &prefix).await;
}
