-- Deployment-wide values, e.g. a value sealed with GATEWAY_SECRET_KEY that
-- every process opens at start to prove it has the same key.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;
