-- Ray keeps a job's runtime_env (tokens included) in its job table until the
-- job is deleted there; the reconciler deletes it a while after the job ended.
ALTER TABLE jobs ADD COLUMN ray_forgotten INTEGER NOT NULL DEFAULT 0 CHECK (ray_forgotten IN (0, 1));
CREATE INDEX jobs_ray_forget ON jobs (updated) WHERE finalized = 1 AND ray_submitted = 1 AND ray_forgotten = 0;
