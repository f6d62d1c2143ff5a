//! The webhook poster: a plain thread that POSTs the oldest buffered events
//! (a JSON array of up to `webhook_batch_size` objects) and removes them from
//! the durable buffer only after a 2xx answer. A partial batch waits up to
//! `webhook_max_delay` for more. A failed POST (no answer, timeout, non-2xx)
//! is retried with the same events after a wait that doubles from
//! `webhook_retry_initial` up to `webhook_retry_max`, for as long as it takes:
//! events are dropped only at the buffer's cap (`max_buffered`), counted.
//! HTTPS servers are verified against the web PKI plus `delivery.tls_ca_file`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use sluice_spool::EventStore;

/// Bytes of the answer read for its status line, at most.
const MAX_ANSWER: usize = 8192;

/// Where events are POSTed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with '/'.
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        let (https, rest) = if lower.starts_with("https://") {
            (true, &url[8..])
        } else if lower.starts_with("http://") {
            (false, &url[7..])
        } else {
            return Err("not http:// or https://".into());
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty()
            || authority.contains('@')
            || authority.contains(char::is_whitespace)
        {
            return Err("no host".into());
        }
        let default = if https { 443 } else { 80 };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p))
                if !h.ends_with(':') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (h, p.parse().map_err(|_| "bad port".to_string())?)
            }
            _ => (authority, default),
        };
        if host.is_empty() || path.contains(char::is_whitespace) {
            return Err("no host".into());
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(Endpoint {
            https,
            host: host.to_string(),
            port,
            path,
        })
    }
}

/// The wait after the `failures`-th failure in a row (1 = the first).
pub fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(30);
    initial.saturating_mul(1u32 << shift).min(max)
}

/// `[{...},{...}]` of the buffered JSON objects.
pub fn body(events: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.iter().map(|e| e.1.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (i, (_, json)) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(json);
    }
    out.push(b']');
    out
}

pub struct Poster {
    pub store: Arc<EventStore>,
    pub endpoint: Endpoint,
    pub batch_size: usize,
    pub max_delay: Duration,
    pub timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// For https:// endpoints.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Poster {
    /// The poster's loop (runs for the life of the process).
    pub fn run(self) {
        let mut failures = 0u32;
        let mut waited = false;
        loop {
            let batch = match self.store.oldest(self.batch_size) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(target: "sluice::events", error = %e, "event buffer read failed");
                    std::thread::sleep(self.retry_max);
                    continue;
                }
            };
            if let Ok(n) = self.store.pending_len() {
                crate::metrics::events_buffered(n);
            }
            if batch.is_empty() {
                std::thread::park_timeout(self.max_delay.max(Duration::from_millis(100)));
                continue;
            }
            // A partial batch waits once for more (the writer wakes us when a
            // full batch is there).
            if batch.len() < self.batch_size && !waited && !self.max_delay.is_zero() {
                waited = true;
                std::thread::park_timeout(self.max_delay);
                continue;
            }
            waited = false;
            match self.post(&body(&batch)) {
                Ok(status) if (200..300).contains(&status) => {
                    failures = 0;
                    // The batch is the oldest pending events, in order.
                    if let Some((last, _)) = batch.last() {
                        self.store.acknowledge_through(*last, batch.len());
                    }
                    crate::metrics::events_posted(batch.len());
                }
                other => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(self.retry_initial, self.retry_max, failures);
                    let why = match other {
                        Ok(status) => format!("HTTP status {status}"),
                        Err(e) => e,
                    };
                    crate::metrics::events_post_failed();
                    tracing::warn!(
                        target: "sluice::events",
                        error = %why,
                        events = batch.len(),
                        retry_in_ms = wait.as_millis() as u64,
                        "webhook POST failed; the events stay buffered"
                    );
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// One POST; answers the status code.
    fn post(&self, body: &[u8]) -> Result<u16, String> {
        let ep = &self.endpoint;
        let host = ep.host.trim_matches(['[', ']']);
        let addr = (host, ep.port)
            .to_socket_addrs()
            .map_err(|e| format!("resolving {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        let tcp = TcpStream::connect_timeout(&addr, self.timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_read_timeout(Some(self.timeout));
        let _ = tcp.set_write_timeout(Some(self.timeout));
        let authority = if (ep.https && ep.port == 443) || (!ep.https && ep.port == 80) {
            ep.host.clone()
        } else {
            format!("{}:{}", ep.host, ep.port)
        };
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: sluice\r\n\r\n",
            ep.path,
            body.len()
        );
        if ep.https {
            let config = self.tls.clone().ok_or("no TLS client configuration")?;
            let name = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
                Err(_) => rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("{host}: {e}"))?,
            };
            let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            exchange(&mut tls, head.as_bytes(), body, &addr)
        } else {
            let mut tcp = tcp;
            exchange(&mut tcp, head.as_bytes(), body, &addr)
        }
    }
}

fn exchange(
    s: &mut (impl Read + Write),
    head: &[u8],
    body: &[u8],
    addr: &std::net::SocketAddr,
) -> Result<u16, String> {
    s.write_all(head)
        .and_then(|()| s.write_all(body))
        .and_then(|()| s.flush())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 2048];
    while answer.len() < MAX_ANSWER && !answer.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("reading the answer of {addr}: {e}")),
        }
    }
    status_of(&answer).ok_or_else(|| format!("{addr}: not an HTTP answer"))
}

/// The status code of an HTTP/1.x status line.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line = String::from_utf8_lossy(answer);
    if !line.starts_with("HTTP/") {
        return None;
    }
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("http://127.0.0.1:8080/hook?x=1").unwrap();
        assert_eq!(
            e,
            Endpoint {
                https: false,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/hook?x=1".into()
            }
        );
        let e = Endpoint::parse("HTTPS://events.example").unwrap();
        assert!(e.https);
        assert_eq!((e.port, e.path.as_str()), (443, "/"));
        let e = Endpoint::parse("https://[::1]:8443/e").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("[::1]", 8443));
        for bad in [
            "ftp://x/",
            "http://",
            "http://u@h/",
            "https:///x",
            "http://h/a b",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(1), s(60), 1), s(1));
        assert_eq!(backoff(s(1), s(60), 2), s(2));
        assert_eq!(backoff(s(1), s(60), 4), s(8));
        assert_eq!(backoff(s(1), s(60), 7), s(60));
        assert_eq!(backoff(s(1), s(60), u32::MAX), s(60));
    }

    #[test]
    fn batch_body_is_a_json_array_and_status_lines_parse() {
        let b = body(&[(0, b"{\"a\":1}".to_vec()), (1, b"{\"b\":2}".to_vec())]);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(status_of(b"HTTP/1.0 204 No Content\r\n"), Some(204));
        assert_eq!(status_of(b"SSH-2.0\r\n"), None);
    }
}
