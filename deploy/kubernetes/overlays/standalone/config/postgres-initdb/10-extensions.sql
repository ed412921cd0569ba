-- Runs once, when the data directory is first initialised, as the superuser in POSTGRES_DB.
-- The sidecar's statement collector reads pg_stat_statements; the library is preloaded by the
-- server command line (shared_preload_libraries). Roles are created by `ops db init`, which runs
-- on every start and keeps them in line with the configured passwords.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
