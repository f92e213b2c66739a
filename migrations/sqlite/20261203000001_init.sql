-- Schema of the embedded (single-node) gateway: the same tables, columns and
-- indexes as migrations/postgres/20261203000001_init.sql, in SQLite types.
--
-- Representation (shared/src/storage/sqlite.rs writes and reads it):
--   * UUIDs: TEXT, lower-case hyphenated (36 characters).
--   * Timestamps: TEXT, UTC RFC 3339 with exactly six fractional digits
--     ('2026-12-03T10:00:00.123456Z'). The fixed width makes text order equal
--     time order, so `ORDER BY created` and `claim_until < ?now` are correct;
--     the CHECKs keep any other shape out. Times are computed by the store.
--   * JSON (JSONB in Postgres): TEXT holding valid JSON.
--   * BYTEA: BLOB. BOOLEAN: INTEGER 0/1.
-- Tables are STRICT, so a value of the wrong type (e.g. a UUID bound as a BLOB)
-- is an error instead of a row no query can find.

CREATE TABLE users (
    id                 TEXT PRIMARY KEY NOT NULL CHECK (length(id) = 36),
    username           TEXT NOT NULL UNIQUE,
    -- QUEUED + PENDING + RUNNING jobs, kept in step with every job insert and
    -- terminal transition so LIMITS_ACTIVE_JOBS_PER_USER is one conditional update.
    active_jobs        INTEGER NOT NULL DEFAULT 0 CHECK (active_jobs >= 0),
    -- All jobs ever created: the unfiltered job list's `count` without COUNT(*).
    total_jobs         INTEGER NOT NULL DEFAULT 0,
    -- Fairness: the user served longest ago is dispatched first.
    last_dispatched_at TEXT CHECK (last_dispatched_at GLOB '????-??-??T??:??:??.??????Z'),
    created            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
                       CHECK (created GLOB '????-??-??T??:??:??.??????Z')
) STRICT;

-- Uploaded working directories, content-addressed so identical uploads are stored once.
CREATE TABLE artifacts (
    sha256  TEXT PRIMARY KEY NOT NULL,
    size    INTEGER NOT NULL,
    data    BLOB NOT NULL,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
            CHECK (created GLOB '????-??-??T??:??:??.??????Z')
) STRICT;

CREATE TABLE programs (
    id                TEXT PRIMARY KEY NOT NULL CHECK (length(id) = 36),
    author_id         TEXT NOT NULL REFERENCES users (id),
    title             TEXT NOT NULL,
    provider          TEXT,
    entrypoint        TEXT NOT NULL,
    artifact_sha256   TEXT REFERENCES artifacts (sha256),
    artifact_name     TEXT,
    dependencies      TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(dependencies)),
    -- Function env vars; values are sealed with GATEWAY_SECRET_KEY.
    env_vars_sealed   BLOB,
    description       TEXT NOT NULL DEFAULT '',
    documentation_url TEXT,
    type              TEXT NOT NULL DEFAULT 'GENERIC',
    version           TEXT,
    runner            TEXT NOT NULL DEFAULT 'ray',
    arguments_schema  TEXT NOT NULL DEFAULT '{}',
    created           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
                      CHECK (created GLOB '????-??-??T??:??:??.??????Z'),
    updated           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
                      CHECK (updated GLOB '????-??-??T??:??:??.??????Z'),
    UNIQUE (author_id, title)
) STRICT;

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY NOT NULL CHECK (length(id) = 36),
    author_id        TEXT NOT NULL REFERENCES users (id),
    program_id       TEXT NOT NULL REFERENCES programs (id),
    status           TEXT NOT NULL CHECK (status IN ('QUEUED', 'PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'STOPPED')),
    sub_status       TEXT,
    arguments        TEXT NOT NULL,
    config           TEXT CHECK (json_valid(config)),
    -- The job's environment with the caller's token, sealed; wiped when the job ends.
    env_sealed       BLOB,
    -- Ray `pip` for the 2023 contract (dependencies given at run time).
    pip              TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(pip)),
    result           TEXT,
    logs             TEXT,
    status_reason    TEXT,
    ray_host         TEXT,
    ray_submitted    INTEGER NOT NULL DEFAULT 0 CHECK (ray_submitted IN (0, 1)),
    -- Ray's own start/end times of the driver, for audits and tests.
    ray_start        TEXT CHECK (ray_start GLOB '????-??-??T??:??:??.??????Z'),
    ray_end          TEXT CHECK (ray_end GLOB '????-??-??T??:??:??.??????Z'),
    -- Dispatch claim: one worker at a time stages and submits a QUEUED job.
    claimed_by       TEXT,
    claim_until      TEXT CHECK (claim_until GLOB '????-??-??T??:??:??.??????Z'),
    dispatch_attempts INTEGER NOT NULL DEFAULT 0,
    -- When a wake-up for this job was last pushed to the queue.
    enqueued_at      TEXT CHECK (enqueued_at GLOB '????-??-??T??:??:??.??????Z'),
    -- Tracking ownership of submitted jobs.
    tracked_by       TEXT,
    track_until      TEXT CHECK (track_until GLOB '????-??-??T??:??:??.??????Z'),
    -- Final logs/result stored and slots released.
    finalized        INTEGER NOT NULL DEFAULT 0 CHECK (finalized IN (0, 1)),
    created          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
                     CHECK (created GLOB '????-??-??T??:??:??.??????Z'),
    updated          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
                     CHECK (updated GLOB '????-??-??T??:??:??.??????Z')
) STRICT;

-- The job list: a user's jobs newest first.
CREATE INDEX jobs_author_created ON jobs (author_id, created DESC, id DESC);
CREATE INDEX jobs_author_status ON jobs (author_id, status, created DESC);
CREATE INDEX jobs_program ON jobs (program_id, created DESC);
-- The dispatcher's and reconciler's view: queued work, oldest first per user.
CREATE INDEX jobs_queued ON jobs (author_id, created) WHERE status = 'QUEUED';
-- The tracker's view: submitted jobs not yet finalized.
CREATE INDEX jobs_tracking ON jobs (created) WHERE ray_submitted AND NOT finalized;

CREATE TABLE job_events (
    -- Rowid alias: increasing, so `ORDER BY id DESC` is newest first.
    id         INTEGER PRIMARY KEY,
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event_type TEXT NOT NULL,
    origin     TEXT NOT NULL,
    context    TEXT NOT NULL,
    data       TEXT NOT NULL CHECK (json_valid(data)),
    created    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
               CHECK (created GLOB '????-??-??T??:??:??.??????Z')
) STRICT;
CREATE INDEX job_events_job ON job_events (job_id, id DESC);

-- Ray clusters (KubeRay mode) and the local head.
CREATE TABLE compute_resources (
    id           TEXT PRIMARY KEY NOT NULL CHECK (length(id) = 36),
    title        TEXT NOT NULL,
    host         TEXT,
    owner_id     TEXT REFERENCES users (id),
    cluster_name TEXT UNIQUE,
    status       TEXT NOT NULL,
    active       INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    created      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
                 CHECK (created GLOB '????-??-??T??:??:??.??????Z'),
    updated      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
                 CHECK (updated GLOB '????-??-??T??:??:??.??????Z')
) STRICT;
CREATE INDEX compute_resources_active ON compute_resources (owner_id) WHERE active;
