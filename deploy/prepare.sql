-- Run once, as the migration's database role, BEFORE starting a sharded run:
--   psql "$DB_CONN_STRING" -v ON_ERROR_STOP=1 -f deploy/prepare.sql
--
-- move.py creates its journal (<table>_move_journal) itself with CREATE TABLE
-- IF NOT EXISTS. N shards starting at the same moment race on that statement
-- and all but one fail (duplicate key in pg_class) on their first attempt.
-- Creating it here first avoids the race, and lets move.py run as a role
-- without CREATE on the schema: it then needs only SELECT, INSERT and UPDATE on
-- the journal (and USAGE on its id sequence). Same DDL as move.py's ensure_journal.

CREATE TABLE IF NOT EXISTS avatars_move_journal (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    old_path text NOT NULL,
    new_path text NOT NULL,
    rows integer NOT NULL,
    tids tid[],
    at timestamptz NOT NULL DEFAULT now(),
    rolled_back_at timestamptz);
CREATE INDEX IF NOT EXISTS avatars_move_journal_run_idx ON avatars_move_journal (run_id);

-- Optional: an index on the path column, so each shard looks rows up by index
-- instead of scanning the table once into a snapshot. Needs the table's owner.
-- (CONCURRENTLY cannot run inside a transaction block: psql -f is fine.)
-- CREATE INDEX CONCURRENTLY IF NOT EXISTS avatars_path_move_idx ON avatars (path);
