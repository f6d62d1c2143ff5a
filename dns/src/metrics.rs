//! Per-core counters. Plain `Cell`s: each resolver lives on one executor, so
//! counting costs an add, and the exporter reads a [`MetricsSnapshot`].

use std::cell::Cell;
use std::net::SocketAddr;

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) queries: Cell<u64>,
    pub(crate) cache_hits: Cell<u64>,
    pub(crate) cache_misses: Cell<u64>,
    pub(crate) inflight_joins: Cell<u64>,
    pub(crate) upstream_queries: Cell<u64>,
    pub(crate) tcp_queries: Cell<u64>,
    pub(crate) timeouts: Cell<u64>,
    pub(crate) failures: Cell<u64>,
}

pub(crate) fn bump(c: &Cell<u64>) {
    c.set(c.get().wrapping_add(1));
}

/// Counters for one upstream server.
#[derive(Debug, Default)]
pub(crate) struct UpstreamMetrics {
    pub(crate) queries: Cell<u64>,
    pub(crate) answers: Cell<u64>,
    pub(crate) failures: Cell<u64>,
    pub(crate) latency_sum_us: Cell<u64>,
}

/// A copy of one core's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Lookups asked of the resolver (cache hits included).
    pub queries: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Misses that joined an identical lookup already in flight on this core.
    pub inflight_joins: u64,
    /// Queries sent upstream (UDP and TCP, retries and failover included).
    pub upstream_queries: u64,
    /// Of those, over TCP (after a truncated UDP answer).
    pub tcp_queries: u64,
    /// Upstream exchanges that ended in a timeout.
    pub timeouts: u64,
    /// Lookups that ended in an error after every server and retry.
    pub failures: u64,
    pub cache_entries: u64,
    pub cache_evictions: u64,
    pub upstreams: Vec<UpstreamSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSnapshot {
    pub server: SocketAddr,
    pub queries: u64,
    /// Answers accepted from this server.
    pub answers: u64,
    /// Timeouts, I/O errors, unusable answers.
    pub failures: u64,
    /// Sum of send-to-answer latency over `answers`, in microseconds.
    pub latency_sum_us: u64,
}

impl UpstreamSnapshot {
    /// Latency sample count (= answers), named for exporters that want sum/count.
    pub fn latency_count(&self) -> u64 {
        self.answers
    }
}
