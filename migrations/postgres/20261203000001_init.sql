-- Schema of the distributed gateway. Migrations are the schema's only source.

CREATE TABLE users (
    id                 UUID PRIMARY KEY,
    username           TEXT NOT NULL UNIQUE,
    -- QUEUED + PENDING + RUNNING jobs, kept in step with every job insert and
    -- terminal transition so LIMITS_ACTIVE_JOBS_PER_USER is one conditional update.
    active_jobs        INTEGER NOT NULL DEFAULT 0 CHECK (active_jobs >= 0),
    -- All jobs ever created: the unfiltered job list's `count` without COUNT(*).
    total_jobs         BIGINT NOT NULL DEFAULT 0,
    -- Fairness: the user served longest ago is dispatched first.
    last_dispatched_at TIMESTAMPTZ,
    created            TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Uploaded working directories, content-addressed so identical uploads are stored once.
CREATE TABLE artifacts (
    sha256  TEXT PRIMARY KEY,
    size    BIGINT NOT NULL,
    data    BYTEA NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE programs (
    id                UUID PRIMARY KEY,
    author_id         UUID NOT NULL REFERENCES users (id),
    title             TEXT NOT NULL,
    provider          TEXT,
    entrypoint        TEXT NOT NULL,
    artifact_sha256   TEXT REFERENCES artifacts (sha256),
    artifact_name     TEXT,
    dependencies      JSONB NOT NULL DEFAULT '[]',
    -- Function env vars; values are sealed with GATEWAY_SECRET_KEY.
    env_vars_sealed   BYTEA,
    description       TEXT NOT NULL DEFAULT '',
    documentation_url TEXT,
    type              TEXT NOT NULL DEFAULT 'GENERIC',
    version           TEXT,
    runner            TEXT NOT NULL DEFAULT 'ray',
    arguments_schema  TEXT NOT NULL DEFAULT '{}',
    created           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated           TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (author_id, title)
);

CREATE TABLE jobs (
    id               UUID PRIMARY KEY,
    author_id        UUID NOT NULL REFERENCES users (id),
    program_id       UUID NOT NULL REFERENCES programs (id),
    status           TEXT NOT NULL CHECK (status IN ('QUEUED', 'PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'STOPPED')),
    sub_status       TEXT,
    arguments        TEXT NOT NULL,
    config           JSONB,
    -- The job's environment with the caller's token, sealed; wiped when the job ends.
    env_sealed       BYTEA,
    -- Ray `pip` for the 2023 contract (dependencies given at run time).
    pip              JSONB NOT NULL DEFAULT '[]',
    result           TEXT,
    logs             TEXT,
    status_reason    TEXT,
    ray_host         TEXT,
    ray_submitted    BOOLEAN NOT NULL DEFAULT false,
    -- Ray's own start/end times of the driver, for audits and tests.
    ray_start        TIMESTAMPTZ,
    ray_end          TIMESTAMPTZ,
    -- Dispatch claim: one worker at a time stages and submits a QUEUED job.
    claimed_by       TEXT,
    claim_until      TIMESTAMPTZ,
    dispatch_attempts INTEGER NOT NULL DEFAULT 0,
    -- When a wake-up for this job was last pushed to the queue.
    enqueued_at      TIMESTAMPTZ,
    -- Tracking ownership of submitted jobs.
    tracked_by       TEXT,
    track_until      TIMESTAMPTZ,
    -- Final logs/result stored and slots released.
    finalized        BOOLEAN NOT NULL DEFAULT false,
    created          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated          TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The job list: a user's jobs newest first.
CREATE INDEX jobs_author_created ON jobs (author_id, created DESC, id DESC);
CREATE INDEX jobs_author_status ON jobs (author_id, status, created DESC);
CREATE INDEX jobs_program ON jobs (program_id, created DESC);
-- The dispatcher's and reconciler's view: queued work, oldest first per user.
CREATE INDEX jobs_queued ON jobs (author_id, created) WHERE status = 'QUEUED';
-- The tracker's view: submitted jobs not yet finalized.
CREATE INDEX jobs_tracking ON jobs (created) WHERE ray_submitted AND NOT finalized;

CREATE TABLE job_events (
    id         BIGSERIAL PRIMARY KEY,
    job_id     UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event_type TEXT NOT NULL,
    origin     TEXT NOT NULL,
    context    TEXT NOT NULL,
    data       JSONB NOT NULL,
    created    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX job_events_job ON job_events (job_id, id DESC);

-- Ray clusters (KubeRay mode) and the local head.
CREATE TABLE compute_resources (
    id           UUID PRIMARY KEY,
    title        TEXT NOT NULL,
    host         TEXT,
    owner_id     UUID REFERENCES users (id),
    cluster_name TEXT UNIQUE,
    status       TEXT NOT NULL,
    active       BOOLEAN NOT NULL DEFAULT true,
    created      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX compute_resources_active ON compute_resources (owner_id) WHERE active;
