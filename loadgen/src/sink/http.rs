//! A tiny HTTP/1.0 endpoint for the sink's stats while it runs:
//! `GET /stats` (JSON summary), `GET /tokens` ("token count" lines) and
//! `POST /reset` (zero the counters). One short-lived thread per request.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::stats::Shared;

pub fn serve(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("sink-http-req".into())
            .spawn(move || {
                let _ = handle(stream, &shared);
            });
    }
}

fn handle(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut req = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && !req.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&chunk[..n]);
        if req.len() > 16 * 1024 {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"too large\n",
            );
        }
    }
    let head = String::from_utf8_lossy(&req);
    let mut first = head.lines().next().unwrap_or("").split_ascii_whitespace();
    let method = first.next().unwrap_or("");
    let target = first.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/stats") => {
            let body = format!("{}\n", shared.summary());
            respond(&mut stream, "200 OK", "application/json", body.as_bytes())
        }
        ("GET", "/tokens") => respond(
            &mut stream,
            "200 OK",
            "text/plain",
            shared.tokens_text().as_bytes(),
        ),
        ("POST", "/reset") => {
            shared.reset();
            respond(&mut stream, "200 OK", "text/plain", b"reset\n")
        }
        ("GET", "/") => respond(
            &mut stream,
            "200 OK",
            "text/plain",
            b"sluice-loadgen sink: GET /stats, GET /tokens, POST /reset\n",
        ),
        ("GET", _) | ("POST", _) => {
            respond(&mut stream, "404 Not Found", "text/plain", b"not found\n")
        }
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"method not allowed\n",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}
