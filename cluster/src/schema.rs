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
