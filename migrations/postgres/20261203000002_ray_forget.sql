-- Ray keeps a job's runtime_env (tokens included) in its job table until the
-- job is deleted there; the reconciler deletes it a while after the job ended.
ALTER TABLE jobs ADD COLUMN ray_forgotten BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX jobs_ray_forget ON jobs (updated) WHERE finalized AND ray_submitted AND NOT ray_forgotten;
