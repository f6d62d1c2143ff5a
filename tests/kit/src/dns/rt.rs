//! Running the resolver inside a test: a glommio executor on the test thread and
//! resolver settings aimed at one server.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use sluice_dns::{IpPreference, ResolverConfig};

/// Run `fut` to completion on a fresh glommio executor (small io_uring memory,
/// like the relay's default, so tests fit the default RLIMIT_MEMLOCK).
pub fn block_on<T>(fut: impl Future<Output = T>) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 * 1024)
        .make()
        .expect("glommio executor")
        .run(fut)
}

pub fn config(servers: &[SocketAddr]) -> ResolverConfig {
    ResolverConfig {
        servers: servers.to_vec(),
        timeout: Duration::from_secs(2),
        attempts: 2,
        ip_preference: IpPreference::PreferIpv4,
        ..ResolverConfig::default()
    }
}

/// [`config`] for a validating resolver whose AD bit is believed
/// (`dns.dnssec_validating`).
pub fn validating(servers: &[SocketAddr]) -> ResolverConfig {
    ResolverConfig {
        dnssec_validating: true,
        ..config(servers)
    }
}

/// Settings for fault tests: short timeout, one attempt.
pub fn quick(servers: &[SocketAddr], timeout_ms: u64) -> ResolverConfig {
    ResolverConfig {
        timeout: Duration::from_millis(timeout_ms),
        attempts: 1,
        ..config(servers)
    }
}

/// Run futures concurrently on the current task; outputs in order.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (fut, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(outputs.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}
