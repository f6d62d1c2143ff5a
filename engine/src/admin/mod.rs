//! The operations listener: `GET /metrics` (Prometheus text) and the management
//! API under `/api/v1` (JSON, bearer token).
//!
//! It runs on its own small pool of plain threads, not on the glommio executors:
//! operator traffic is rare, may block on answers from every core, and must never
//! take time from SMTP sessions. API handlers reach the cores through channels
//! (see `api`).

pub mod api;
mod ban_api;
mod calls;
pub mod cli;
mod queue_view;
mod shaping_api;
mod suppression_api;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context};

/// Largest request body the API reads (JSON commands are small).
const MAX_BODY: u64 = 1 << 20;
/// Threads serving requests: one slow API call must not block a scrape.
const WORKERS: usize = 2;

/// A configuration reload: Ok(summary of what changed) or Err(why refused).
pub type ReloadFn = dyn Fn() -> Result<String, String> + Send + Sync;

/// What request handlers can reach.
pub struct AdminState {
    /// Bearer token for `/api/v1`; None: the API is closed (401).
    pub token: Option<String>,
    /// Whether `/metrics` wants the token as well.
    pub metrics_auth: bool,
    /// Reloads the configuration (the same path as SIGHUP), when available.
    pub reload: Option<Arc<ReloadFn>>,
    /// The queue side of the API: channels to the cores.
    pub api: api::ApiContext,
}

/// A request as the handlers see it.
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A reply: status, content type, body.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
        }
    }
}

/// The running listener; `stop` ends it.
pub struct AdminServer {
    server: Arc<tiny_http::Server>,
    workers: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl AdminServer {
    pub fn start(listen: &str, state: Arc<AdminState>) -> anyhow::Result<AdminServer> {
        let addr: SocketAddr = listen
            .parse()
            .map_err(|e| anyhow!("admin.listen: {listen:?} is not IP:PORT: {e}"))?;
        let server = Arc::new(
            tiny_http::Server::http(addr)
                .map_err(|e| anyhow!("admin.listen: cannot bind {addr}: {e}"))?,
        );
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow!("admin.listen: not an IP listener"))?;
        let mut workers = Vec::with_capacity(WORKERS);
        for i in 0..WORKERS {
            let server = server.clone();
            let state = state.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("sluice-admin-{i}"))
                    .spawn(move || serve(&server, &state))
                    .context("starting admin thread")?,
            );
        }
        tracing::info!(%addr, "admin listener: /metrics, /api/v1");
        Ok(AdminServer {
            server,
            workers,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(self) {
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers {
            let _ = w.join();
        }
    }
}

fn serve(server: &tiny_http::Server, state: &AdminState) {
    while let Ok(mut raw) = server.recv() {
        let response = match read_request(&mut raw) {
            Ok(req) => route(state, &raw, &req),
            Err(resp) => resp,
        };
        let status = response.status;
        let content_type = tiny_http::Header::from_bytes("Content-Type", response.content_type)
            .expect("static header is valid");
        let reply = tiny_http::Response::from_data(response.body)
            .with_status_code(status)
            .with_header(content_type);
        if let Err(e) = raw.respond(reply) {
            tracing::debug!("admin: writing response: {e}");
        }
    }
}

fn read_request(raw: &mut tiny_http::Request) -> Result<Request, Response> {
    let url = raw.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let mut body = Vec::new();
    if raw.body_length().unwrap_or(0) as u64 > MAX_BODY {
        return Err(Response::error(413, "request body too large"));
    }
    raw.as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| Response::error(400, &format!("reading body: {e}")))?;
    if body.len() as u64 > MAX_BODY {
        return Err(Response::error(413, "request body too large"));
    }
    Ok(Request {
        method: raw.method().as_str().to_ascii_uppercase(),
        path: percent_decode(path),
        query: parse_query(query),
        body,
    })
}

fn route(state: &AdminState, raw: &tiny_http::Request, req: &Request) -> Response {
    match req.path.as_str() {
        "/metrics" => {
            if state.metrics_auth && !authorized(state, raw) {
                return unauthorized(state);
            }
            Response::text(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(),
            )
        }
        "/healthz" => Response::text(200, "text/plain", "ok\n".into()),
        p if p.starts_with("/api/") => {
            if !authorized(state, raw) {
                return unauthorized(state);
            }
            api::handle(state, req)
        }
        _ => Response::error(404, "no such path"),
    }
}

fn unauthorized(state: &AdminState) -> Response {
    if state.token.is_none() {
        Response::error(401, "the API is closed: set admin.token_file")
    } else {
        Response::error(401, "missing or wrong bearer token")
    }
}

fn authorized(state: &AdminState, raw: &tiny_http::Request) -> bool {
    let Some(token) = &state.token else {
        return false;
    };
    raw.headers()
        .iter()
        .filter(|h| h.field.equiv("Authorization"))
        .filter_map(|h| h.value.as_str().strip_prefix("Bearer "))
        .any(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// Compares without an early exit, so timing does not reveal the token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `%XX` and `+` decoding for paths and query strings; bad escapes stay as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads the API token file named by `admin.token_file`.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("admin.token_file: reading {}", path.display()))?;
    let token = text.trim().to_string();
    anyhow::ensure!(
        token.len() >= 16,
        "admin.token_file: {}: the token must be at least 16 characters",
        path.display()
    );
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let q = parse_query("recipient=a%40b.example&limit=5&x&note=two+words");
        assert_eq!(q[0], ("recipient".into(), "a@b.example".into()));
        assert_eq!(q[1], ("limit".into(), "5".into()));
        assert_eq!(q[2], ("x".into(), "".into()));
        assert_eq!(q[3], ("note".into(), "two words".into()));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
