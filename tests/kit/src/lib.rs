//! The shared kit of sluice's integration tests (tests/*.rs), one crate every
//! test binary depends on instead of copying helpers:
//!
//! - [`process`]: where the workspace's binaries are, child processes killed and
//!   reaped by pid on drop, polling with a deadline, and the skip policy for
//!   missing peer tools ([`require_tool`]: a failure under CI=true, a skip line
//!   elsewhere);
//! - [`relay`]: the real `sluice run` on free ports with `--set` overrides;
//! - [`client`]: a raw SMTP client, swaks, certificates, stored-message checks;
//! - [`nsd`]: a real NSD serving the fixture zones or a zone the test writes;
//! - [`delivery`]: loopback next hops (loadgen sink, Postfix smtp-sink), a relay
//!   delivering through the test's DNS, its JSON log, DSNs read by Python;
//! - [`smtp_server`]: a scripted SMTP next hop (capabilities, strict or lenient
//!   pipelining, per-verb replies, stalls, refusals, no-read) that records what
//!   it was sent;
//! - [`postfix`]: a private Postfix instance relaying to one next hop;
//! - [`procfs`]: a process's TCP connections and memory from /proc;
//! - [`dns`]: running the resolver in a test, and a scripted DNS server;
//! - [`dnssec`]: signed zones on NSD behind a validating unbound (secure,
//!   bogus and insecure answers for the DANE tests);
//! - [`mta_sts`]: an HTTPS MTA-STS policy server (Python) serving what the test writes;
//! - [`hook`]: the test HTTP hook (Python), logging the documents it is sent.
//!
//! Tests `use sluice_testkit::*;` for the everyday items; the DNS pieces stay
//! under [`dns`] and [`nsd`].

pub mod client;
pub mod delivery;
pub mod dns;
pub mod dnssec;
pub mod hook;
pub mod mta_sts;
pub mod nsd;
pub mod postfix;
pub mod postgres;
pub mod process;
pub mod procfs;
pub mod relay;
pub mod smtp_server;
pub mod tls_receiver;

pub use client::*;
pub use delivery::*;
pub use hook::HookServer;
pub use nsd::{Nsd, BROKEN_ZONE};
pub use postfix::{can_run_postfix, PostfixRelay};
pub use process::*;
pub use procfs::*;
pub use relay::*;
pub use smtp_server::*;
pub use tls_receiver::TlsReceiver;
