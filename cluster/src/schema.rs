//! The engine's tables (docs/cluster.md), created at join.

/// Serialises concurrent joins' CREATEs (IF NOT EXISTS races otherwise).
pub const SCHEMA_LOCK: i64 = 0x0051_1ce0_c105;

pub const CREATE: &str = "
CREATE TABLE IF NOT EXISTS sluice_node (
    node_id     text PRIMARY KEY,
    epoch       bigint NOT NULL,
    state       text NOT NULL,
    lease_until timestamptz NOT NULL,
    version     text,
    started_at  timestamptz,
    taken_by    text);
CREATE TABLE IF NOT EXISTS sluice_message (
    origin_node text   NOT NULL,
    msg_id      bigint NOT NULL,
    envelope    bytea  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin_node, msg_id))
  WITH (autovacuum_vacuum_scale_factor = 0.01, fillfactor = 90);
CREATE TABLE IF NOT EXISTS sluice_body (
    origin_node text   NOT NULL,
    msg_id      bigint NOT NULL,
    body        bytea  NOT NULL,
    PRIMARY KEY (origin_node, msg_id))
  WITH (autovacuum_vacuum_scale_factor = 0.01);
ALTER TABLE sluice_body ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS sluice_taken (
    origin_node text   NOT NULL,
    msg_id      bigint NOT NULL,
    taken_by    text   NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin_node, msg_id));
";

/// Item 3's tables and functions (shared limits, actions): created at join
/// when `sluice_action` is missing (an engine first used by an older node
/// has the tables above only). Every statement is idempotent.
pub const CREATE_LIMITS: &str = "
CREATE UNLOGGED TABLE IF NOT EXISTS sluice_conn_slot (
    key        text   NOT NULL,
    slot       int    NOT NULL,
    node_id    text   NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (key, slot));
CREATE INDEX IF NOT EXISTS sluice_conn_slot_node ON sluice_conn_slot (node_id);
CREATE UNLOGGED TABLE IF NOT EXISTS sluice_rate (
    key text PRIMARY KEY,
    tat bigint NOT NULL);
CREATE TABLE IF NOT EXISTS sluice_action (
    id          bigserial PRIMARY KEY,
    scope       text NOT NULL,
    key         text NOT NULL,
    action      jsonb,
    until       timestamptz NOT NULL,
    origin_node text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now());
-- The first free slot below lim (a missing row, or one past its lease), or -1.
CREATE OR REPLACE FUNCTION sluice_take_slot(k text, lim int, node text, lease_ms bigint)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE s int;
BEGIN
  FOR s IN 0 .. lim - 1 LOOP
    INSERT INTO sluice_conn_slot AS c (key, slot, node_id, expires_at)
      VALUES (k, s, node, clock_timestamp() + lease_ms * interval '1 millisecond')
      ON CONFLICT (key, slot) DO UPDATE
        SET node_id = EXCLUDED.node_id, expires_at = EXCLUDED.expires_at
        WHERE c.expires_at < clock_timestamp();
    IF FOUND THEN RETURN s; END IF;
  END LOOP;
  RETURN -1;
END $$;
-- GCRA on the engine's clock: up to `want` permits of a rate whose emission
-- interval is iv µs and window win µs. Returns (granted, µs to wait when 0).
CREATE OR REPLACE FUNCTION sluice_take_permits(k text, iv bigint, win bigint, want int)
RETURNS TABLE(granted int, wait_us bigint) LANGUAGE plpgsql AS $$
DECLARE
  now_us bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
  t bigint;
  base bigint;
  n bigint;
BEGIN
  INSERT INTO sluice_rate (key, tat) VALUES (k, now_us) ON CONFLICT (key) DO NOTHING;
  SELECT r.tat INTO t FROM sluice_rate r WHERE r.key = k FOR UPDATE;
  base := greatest(t, now_us);
  n := least(want::bigint, (win - (base - now_us)) / iv);
  IF n < 1 THEN
    RETURN QUERY SELECT 0, greatest(base + iv - win - now_us, 1);
    RETURN;
  END IF;
  UPDATE sluice_rate SET tat = base + n * iv WHERE key = k;
  RETURN QUERY SELECT n::int, 0::bigint;
END $$;
";
