//! Talking SMTP to the relay: a raw-socket client with reply parsing, checks on
//! stored messages, and the real clients (swaks, openssl for certificates,
//! `sluice hash-password`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Output, Stdio};
use std::time::Duration;

use crate::process::{assert_ok, bin, need_tool, run_with_timeout, text, ChildGuard, IO_TIMEOUT};
use crate::relay::Relay;

#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    /// Each line as received, without CRLF.
    pub lines: Vec<String>,
}

impl Reply {
    /// The text of all lines after "NNN-" / "NNN ".
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|l| l.get(4..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }

    /// The enhanced status code of the last line ("2.0.0"), if any.
    pub fn enhanced(&self) -> &str {
        self.last()
            .get(4..)
            .and_then(|t| t.split(' ').next())
            .unwrap_or("")
    }

    pub fn has_line_starting(&self, prefix: &str) -> bool {
        self.lines
            .iter()
            .any(|l| l.get(4..).is_some_and(|t| t.starts_with(prefix)))
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Client::from_stream(s)
    }

    /// Connects from a chosen loopback source address (e.g. 127.0.0.2).
    pub fn connect_from(src: Ipv4Addr, addr: SocketAddr) -> Client {
        // SAFETY: plain socket/bind/connect on a fresh fd we own, handed to TcpStream.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let stream = TcpStream::from_raw_fd(fd);
            let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                sin_zero: [0; 8],
            };
            let local = sin(src, 0);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
            assert_eq!(rc, 0, "bind {src}: {}", std::io::Error::last_os_error());
            let IpAddr::V4(dst_ip) = addr.ip() else {
                panic!("IPv4 only")
            };
            let remote = sin(dst_ip, addr.port());
            let rc = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
            assert_eq!(
                rc,
                0,
                "connect {addr} from {src}: {}",
                std::io::Error::last_os_error()
            );
            Client::from_stream(stream)
        }
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write {:?}: {e}", text(&bytes[..bytes.len().min(80)])));
    }

    pub fn send_line(&mut self, line: &str) {
        self.send(format!("{line}\r\n").as_bytes());
    }

    /// One CRLF-terminated line (without the CRLF); Ok(None) at EOF before any byte.
    pub fn try_read_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..at + 2).collect();
                return Ok(Some(text(&line[..at])));
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("EOF inside a line: {:?}", text(&self.buf)),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn read_line(&mut self) -> String {
        match self.try_read_line() {
            Ok(Some(l)) => l,
            Ok(None) => panic!("connection closed while waiting for a reply line"),
            Err(e) => panic!("reading a reply line: {e}"),
        }
    }

    /// A complete (possibly multi-line) reply.
    pub fn read_reply(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line();
            assert!(
                line.len() >= 3 && line.as_bytes()[..3].iter().all(u8::is_ascii_digit),
                "malformed reply line {line:?} (after {lines:?})"
            );
            let code: u16 = line[..3].parse().unwrap();
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return Reply { code, lines };
            }
        }
    }

    /// A reply, or None when the server closed the connection first.
    pub fn try_read_reply(&mut self) -> Option<Reply> {
        match self.try_read_line() {
            Ok(None) => None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading a reply: {e}"),
            Ok(Some(first)) => {
                let code: u16 = first
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or_else(|| panic!("malformed reply line {first:?}"));
                let mut lines = vec![first.clone()];
                if first.as_bytes().get(3) == Some(&b'-') {
                    let rest = self.read_reply();
                    lines.extend(rest.lines);
                }
                Some(Reply { code, lines })
            }
        }
    }

    /// Sends a command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send_line(line);
        self.read_reply()
    }

    /// Sends a command and asserts the reply code.
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line);
        assert_eq!(r.code, code, "{line:?} got {r:?}");
        r
    }

    /// Reads until the server closes; returns whatever bytes arrived before (a reset
    /// after the server closed counts as closed).
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let mut all = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return all,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
                Err(e) => panic!(
                    "waiting for the server to close: {e} (got {:?})",
                    text(&all)
                ),
            }
        }
    }

    /// Asserts the server closes the connection with nothing more to say.
    pub fn expect_closed(&mut self) {
        let rest = self.read_to_eof();
        assert!(
            rest.is_empty(),
            "expected the connection to close, got {:?}",
            text(&rest)
        );
    }

    /// MAIL, RCPT…, DATA, body (already dot-stuffed, without the final ".\r\n"),
    /// one command at a time; returns the queued id.
    pub fn send_mail(&mut self, from: &str, rcpts: &[&str], wire_body: &[u8]) -> String {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250);
        }
        self.expect("DATA", 354);
        self.send(wire_body);
        self.send(b".\r\n");
        let r = self.read_reply();
        assert_eq!(r.code, 250, "end of data: {r:?}");
        queued_id(&r.text()).unwrap_or_else(|| panic!("no queued id in {r:?}"))
    }
}

/// The id in "... queued as 0123456789ABCDEF".
pub fn queued_id(text: &str) -> Option<String> {
    let at = text.find("queued as ")? + "queued as ".len();
    let id: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit())).then_some(id)
}

/// Splits a stored message into our Received: header (with its CRLF) and the rest.
pub fn split_received(stored: &[u8]) -> (&[u8], &[u8]) {
    assert!(
        stored.starts_with(b"Received: "),
        "stored message does not start with Received: {:?}",
        text(&stored[..stored.len().min(200)])
    );
    let mut pos = 0;
    loop {
        let at = stored[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("unterminated Received: header")
            + pos
            + 2;
        if stored.get(at) == Some(&b'\t') || stored.get(at) == Some(&b' ') {
            pos = at;
            continue;
        }
        return stored.split_at(at);
    }
}

/// Asserts the stored message is our Received: header followed by exactly `sent`.
pub fn assert_stored_exact(stored: &[u8], sent: &[u8], id: &str) {
    let (header, rest) = split_received(stored);
    let h = text(header);
    assert!(
        h.contains(&format!("id {id}")),
        "Received: header lacks `id {id}`: {h:?}"
    );
    assert!(
        rest == sent,
        "stored bytes differ from what was sent\n  sent:   {:?}\n  stored: {:?}",
        text(sent),
        text(rest)
    );
}

/// Lines of `queue show` output starting with `prefix`.
pub fn show_lines<'a>(show: &'a str, prefix: &str) -> Vec<&'a str> {
    show.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// The value of the first `key: value` line of `queue show` output.
pub fn show_field<'a>(show: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}:");
    show.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `{key}:` line in queue show output:\n{show}"))
}

// ---------------------------------------------------------------------------------
// TLS material, passwords
// ---------------------------------------------------------------------------------

/// Makes a self-signed certificate and key for "localhost" with the openssl CLI.
pub fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    need_tool("openssl", "openssl");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = run_with_timeout(
        Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]),
        Duration::from_secs(30),
    );
    assert_ok(&out, "openssl req");
    (cert, key)
}

/// A test certificate authority (EC P-256, two days) made with the openssl
/// CLI: `(cert, key)` as `STEM.pem` and `STEM.key` in `dir`.
pub fn make_ca(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={stem} test CA"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &path_str(&key),
        "-out",
        &path_str(&cert),
    ]);
    (cert, key)
}

/// A leaf certificate for `name` (CN and DNS subjectAltName) issued by `ca`
/// (its cert and key), good for server and client authentication: `(cert,
/// key)` as `STEM.pem` and `STEM.key` in `dir`.
pub fn make_issued_cert(
    dir: &Path,
    ca: &(PathBuf, PathBuf),
    stem: &str,
    name: &str,
) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    let csr = dir.join(format!("{stem}.csr"));
    let ext = dir.join(format!("{stem}.ext"));
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        ),
    )
    .unwrap();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        &path_str(&key),
        "-out",
        &path_str(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path_str(&csr),
        "-CA",
        &path_str(&ca.0),
        "-CAkey",
        &path_str(&ca.1),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &path_str(&ext),
        "-out",
        &path_str(&cert),
    ]);
    (cert, key)
}

/// A self-signed certificate for `name` (CN and DNS subjectAltName): `(cert,
/// key)` as `STEM.pem` and `STEM.key` in `dir`.
pub fn make_self_signed(dir: &Path, stem: &str, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name}"),
        "-addext",
        &format!("subjectAltName=DNS:{name}"),
        "-keyout",
        &path_str(&key),
        "-out",
        &path_str(&cert),
    ]);
    (cert, key)
}

fn openssl(args: &[&str]) {
    need_tool("openssl", "openssl");
    let out = run_with_timeout(Command::new("openssl").args(args), Duration::from_secs(30));
    assert_ok(&out, &format!("openssl {}", args[..2].join(" ")));
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

/// `sluice hash-password` with the password on stdin.
pub fn hash_password(password: &str) -> String {
    let mut child = ChildGuard::new(
        Command::new(bin())
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hash-password"),
        "hash-password",
    );
    {
        let mut stdin = child.child.as_mut().unwrap().stdin.take().unwrap();
        stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    }
    let mut stdout = child.take_stdout();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let status = child
        .wait_timeout(Duration::from_secs(30))
        .expect("hash-password hangs");
    assert!(status.success(), "hash-password failed: {status}");
    let hash = out.trim().to_string();
    assert!(
        hash.starts_with("$argon2id$"),
        "hash-password printed {hash:?}"
    );
    hash
}

/// Reads lines from a child's stdout, calling `f` on each until it returns false or EOF.
pub fn for_each_line(stdout: ChildStdout, mut f: impl FnMut(&str) -> bool) {
    let reader = BufReader::new(stdout);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if !f(&line) {
            break;
        }
    }
}

/// Runs swaks against the relay with extra arguments; returns the output.
pub fn swaks(relay: &Relay, args: &[&str]) -> Output {
    need_tool("swaks", "swaks");
    run_with_timeout(
        Command::new("swaks")
            .arg("--server")
            .arg(relay.addr_string())
            .args(["--timeout", "10", "--helo", "swaks.test"])
            .args(args),
        Duration::from_secs(30),
    )
}

/// The queued ids in a swaks transcript ("<-  250 2.0.0 Ok: queued as …").
pub fn swaks_ids(out: &Output) -> Vec<String> {
    text(&out.stdout)
        .lines()
        .filter(|l| (l.contains("<-") || l.contains("<~")) && l.contains(" 250 "))
        .filter_map(queued_id)
        .collect()
}
