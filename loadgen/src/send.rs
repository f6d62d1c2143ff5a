//! `sluice-loadgen send`: an SMTP load source that should never be the bottleneck.
//!
//! Thread per core on glommio, like the sink: one pinned executor per core, the
//! connections spread over them round robin. Each connection sends its share of
//! the messages back to back (closed loop) or, with `--rate`, at scheduled start
//! times (open loop: latency counts from the scheduled time, so a server that
//! falls behind shows up in the percentiles instead of slowing the source down).
//!
//! Message `k` (0-based, over the whole run) belongs to connection `k % C` as its
//! `k / C`-th message; its token is `lg-[RUN-]CONN-N` (Message-ID and Subject),
//! so with a fixed message count the token set is known in advance.
//! With `--message FILE` every message is that file (a pre-signed template, for
//! DKIM-signed load) under an added `X-Loadgen-Token:` field carrying the token:
//! outside any signature's `h=`, so the signatures stay valid.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;

#[derive(clap::Args, Clone)]
pub struct SendArgs {
    /// Target host:port.
    #[arg(long, default_value = "127.0.0.1:2525")]
    target: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Total messages, split over the connections (default 10000, or no limit
    /// with --duration).
    #[arg(long)]
    messages: Option<u64>,
    /// Send for this long (e.g. 10s) instead of a fixed count.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Executors (pinned, one per core); 0 = every CPU (at most one per connection).
    #[arg(long, default_value_t = 0)]
    cores: usize,
    /// Message size in bytes (headers included), unless --size-dist.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Message sizes: `uniform:MIN:MAX` or a list `1024,20480,102400` (picked at random).
    #[arg(long, value_parser = SizeDist::parse)]
    size_dist: Option<SizeDist>,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Recipient domain (when --domains is 0).
    #[arg(long, default_value = "example.com")]
    domain: String,
    /// Spread recipients over N domains d0.example … dN-1.example (0 = --domain only).
    #[arg(long, default_value_t = 0)]
    domains: usize,
    /// Distribution over --domains: `uniform` (rotating) or `zipf:S` (d0 most frequent).
    #[arg(long, default_value = "uniform", value_parser = DomainDist::parse)]
    domain_dist: DomainDist,
    /// Messages per connection before QUIT and reconnect (0 = no limit).
    #[arg(long, default_value_t = 0)]
    per_connection: u64,
    /// One command per round trip (no PIPELINING).
    #[arg(long)]
    no_pipelining: bool,
    /// Send the message with BDAT … LAST (CHUNKING) instead of DATA.
    #[arg(long)]
    chunking: bool,
    /// STARTTLS after EHLO (any certificate accepted).
    #[arg(long)]
    starttls: bool,
    /// AUTH PLAIN with these credentials (after STARTTLS when both are given).
    #[arg(long, value_name = "USER:PASS")]
    auth: Option<String>,
    /// Open loop: this many messages per second over all connections.
    #[arg(long)]
    rate: Option<f64>,
    /// Write one line per accepted message: `TOKEN QUEUE-ID` (`-` when the 250 has none).
    #[arg(long, value_name = "FILE")]
    ack_log: Option<PathBuf>,
    /// Prefix every token with a run id so tokens are unique across runs:
    /// `auto` (start time and pid) or a literal.
    #[arg(long, value_name = "ID|auto")]
    run_id: Option<String>,
    /// Seed for sizes and domain draws (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Timeout for each reply.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    timeout: Duration,
    /// io_uring buffer memory per executor, in bytes.
    #[arg(long, default_value_t = 512 * 1024)]
    io_memory: usize,
    /// Print the JSON summary only.
    #[arg(long)]
    json: bool,
    /// Send this message (e.g. DKIM-signed once beforehand) instead of a
    /// generated one, under an `X-Loadgen-Token:` field; --size is ignored.
    #[arg(long, value_name = "FILE")]
    message: Option<PathBuf>,
    /// Start every connection with a PROXY protocol v1 header whose source is
    /// the next of these addresses (round robin over all connections opened),
    /// so one machine looks like many clients to a PROXY listener.
    #[arg(long, value_name = "IP,IP,...", value_parser = parse_sources)]
    proxy_sources: Option<ProxySources>,
}

/// `--proxy-sources` (a newtype: clap would read a bare Vec as many values).
#[derive(Clone, Debug)]
pub struct ProxySources(Vec<IpAddr>);

fn parse_sources(s: &str) -> Result<ProxySources, String> {
    let list = s
        .split(',')
        .map(|a| {
            a.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("{a:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() || list.len() > 65_536 {
        return Err("between 1 and 65536 addresses".into());
    }
    Ok(ProxySources(list))
}

/// The PROXY v1 line for a connection from `src` to `dst` (the family of the
/// source; the destination is unspecified when its family differs).
fn proxy_header(src: IpAddr, dst: SocketAddr, n: usize) -> String {
    let port = 10_000 + (n % 50_000);
    let (family, dst_ip) = match (src, dst.ip()) {
        (IpAddr::V4(_), d @ IpAddr::V4(_)) => ("TCP4", d.to_string()),
        (IpAddr::V4(_), _) => ("TCP4", "0.0.0.0".to_string()),
        (IpAddr::V6(_), d @ IpAddr::V6(_)) => ("TCP6", d.to_string()),
        (IpAddr::V6(_), _) => ("TCP6", "::".to_string()),
    };
    format!("PROXY {family} {src} {dst_ip} {port} {}\r\n", dst.port())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Clone, Debug)]
pub enum SizeDist {
    Fixed(usize),
    Uniform(usize, usize),
    List(Vec<usize>),
}

impl SizeDist {
    fn parse(s: &str) -> Result<SizeDist, String> {
        let num = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|e| format!("size {v:?}: {e}"))
        };
        if let Some(rest) = s.strip_prefix("uniform:") {
            let (a, b) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: expected uniform:MIN:MAX"))?;
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("{s:?}: MIN > MAX"));
            }
            return Ok(SizeDist::Uniform(a, b));
        }
        let list = s.split(',').map(num).collect::<Result<Vec<_>, _>>()?;
        Ok(SizeDist::List(list))
    }

    fn pick(&self, rng: &mut Rng) -> usize {
        match self {
            SizeDist::Fixed(n) => *n,
            SizeDist::Uniform(a, b) => a + (rng.next() % (b - a + 1) as u64) as usize,
            SizeDist::List(v) => v[(rng.next() % v.len() as u64) as usize],
        }
    }

    fn describe(&self) -> String {
        match self {
            SizeDist::Fixed(n) => n.to_string(),
            SizeDist::Uniform(a, b) => format!("uniform:{a}:{b}"),
            SizeDist::List(v) => v
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

#[derive(Clone, Debug)]
pub enum DomainDist {
    Uniform,
    Zipf(f64),
}

impl DomainDist {
    fn parse(s: &str) -> Result<DomainDist, String> {
        if s == "uniform" {
            return Ok(DomainDist::Uniform);
        }
        if let Some(v) = s.strip_prefix("zipf:") {
            let e: f64 = v.parse().map_err(|e| format!("{s:?}: {e}"))?;
            if !(e.is_finite() && e >= 0.0) {
                return Err(format!("{s:?}: exponent must be ≥ 0"));
            }
            return Ok(DomainDist::Zipf(e));
        }
        Err(format!("{s:?}: expected uniform or zipf:S"))
    }
}

/// splitmix64: small, seeded, good enough for draws.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Cumulative zipf weights 1/(i+1)^s over n items, normalised to end at 1.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (0..n)
        .map(|i| {
            acc += 1.0 / ((i + 1) as f64).powf(s);
            acc
        })
        .collect();
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What every connection shares (immutable).
struct Plan {
    addr: SocketAddr,
    server_name: rustls_pki_types::ServerName<'static>,
    tls: Option<Arc<rustls::ClientConfig>>,
    auth: Option<String>,
    connections: usize,
    limit: Option<u64>,
    start: Instant,
    end: Option<Instant>,
    rate: Option<f64>,
    sizes: SizeDist,
    recipients: usize,
    domains: Vec<String>,
    zipf: Option<Vec<f64>>,
    per_connection: u64,
    pipelining: bool,
    chunking: bool,
    prefix: String,
    seed: u64,
    timeout: Duration,
    ack_log: bool,
    /// `--message`: the file as sent with BDAT, and dot-stuffed for DATA.
    template: Option<(Vec<u8>, Vec<u8>)>,
    /// `--proxy-sources`, and the next one's index (over all cores).
    proxy_sources: Vec<IpAddr>,
    next_source: AtomicUsize,
}

impl Plan {
    fn domain(&self, rng: &mut Rng, k: u64, r: usize) -> usize {
        match &self.zipf {
            Some(cdf) => {
                let u = rng.unit();
                cdf.partition_point(|&c| c < u).min(self.domains.len() - 1)
            }
            None => ((k as usize).wrapping_add(r)) % self.domains.len(),
        }
    }
}

/// Results of one core (merged at the end).
struct CoreOut {
    txn: Histogram<u64>,
    eod: Histogram<u64>,
    attempted: u64,
    accepted: u64,
    rejected: u64,
    failed: u64,
    bytes: u64,
    connects: u64,
    connection_errors: u64,
    codes: BTreeMap<u16, u64>,
    domains: BTreeMap<String, u64>,
    /// Per `--proxy-sources` address: (accepted, refused) transactions.
    sources: BTreeMap<IpAddr, (u64, u64)>,
    acks: String,
    errors: Vec<String>,
}

/// Latencies up to an hour, in microseconds.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

impl CoreOut {
    fn new() -> CoreOut {
        CoreOut {
            txn: histogram(),
            eod: histogram(),
            attempted: 0,
            accepted: 0,
            rejected: 0,
            failed: 0,
            bytes: 0,
            connects: 0,
            connection_errors: 0,
            codes: BTreeMap::new(),
            domains: BTreeMap::new(),
            sources: BTreeMap::new(),
            acks: String::new(),
            errors: Vec::new(),
        }
    }

    fn merge(&mut self, o: CoreOut) -> anyhow::Result<()> {
        self.txn.add(&o.txn)?;
        self.eod.add(&o.eod)?;
        self.attempted += o.attempted;
        self.accepted += o.accepted;
        self.rejected += o.rejected;
        self.failed += o.failed;
        self.bytes += o.bytes;
        self.connects += o.connects;
        self.connection_errors += o.connection_errors;
        for (c, n) in o.codes {
            *self.codes.entry(c).or_insert(0) += n;
        }
        for (d, n) in o.domains {
            *self.domains.entry(d).or_insert(0) += n;
        }
        for (ip, (a, r)) in o.sources {
            let e = self.sources.entry(ip).or_insert((0, 0));
            e.0 += a;
            e.1 += r;
        }
        self.acks.push_str(&o.acks);
        self.errors.extend(o.errors);
        Ok(())
    }
}

/// An SMTP reply that was not the one expected.
#[derive(Debug)]
struct Refused(u16, String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

impl std::error::Error for Refused {}

enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

struct Client {
    /// The `--proxy-sources` address this connection claims.
    source: Option<IpAddr>,
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    timeout: Duration,
}

/// Races a future against a timer; None when the timer wins.
async fn within<T>(dur: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        Timer::new(dur).await;
        None
    })
    .await
}

impl Client {
    async fn write_all(&mut self, data: &[u8]) -> anyhow::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => s.write_all(data).await?,
            Stream::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await?
            }
            Stream::Gone => bail!("not connected"),
        }
        Ok(())
    }

    async fn read_more(&mut self) -> anyhow::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            if self.buf.len() >= 1 << 20 {
                bail!("reply too long");
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let timeout = self.timeout;
        let buf = &mut self.buf[self.end..];
        let n = match &mut self.stream {
            Stream::Plain(s) => within(timeout, s.read(buf)).await,
            Stream::Tls(s) => within(timeout, s.read(buf)).await,
            Stream::Gone => bail!("not connected"),
        }
        .ok_or_else(|| anyhow!("reply timeout"))??;
        if n == 0 {
            bail!("connection closed");
        }
        self.end += n;
        Ok(())
    }

    /// The next (possibly multi-line) reply: its code and the text of its last line.
    async fn reply(&mut self) -> anyhow::Result<(u16, String)> {
        loop {
            let Some(nl) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) else {
                self.read_more().await?;
                continue;
            };
            let line = &self.buf[self.start..self.start + nl];
            self.start += nl + 1;
            let line = String::from_utf8_lossy(line).trim_end().to_string();
            if line.len() < 3 {
                bail!("short reply {line:?}");
            }
            let code: u16 = line[..3]
                .parse()
                .with_context(|| format!("bad reply {line:?}"))?;
            if line.as_bytes().get(3) == Some(&b'-') {
                continue;
            }
            let text = line.get(4..).unwrap_or("").to_string();
            return Ok((code, text));
        }
    }

    async fn expect(&mut self, cmd: &[u8], want: u16) -> anyhow::Result<()> {
        if !cmd.is_empty() {
            self.write_all(cmd).await?;
        }
        let (code, text) = self.reply().await?;
        if code != want {
            return Err(Refused(code, text).into());
        }
        Ok(())
    }

    async fn open(plan: &Plan) -> anyhow::Result<Client> {
        let tcp = within(plan.timeout, TcpStream::connect(plan.addr))
            .await
            .ok_or_else(|| anyhow!("connect timeout"))?
            .map_err(|e| anyhow!("connecting {}: {e}", plan.addr))?;
        let _ = tcp.set_nodelay(true);
        let source = (!plan.proxy_sources.is_empty()).then(|| {
            let n = plan.next_source.fetch_add(1, Ordering::Relaxed);
            (plan.proxy_sources[n % plan.proxy_sources.len()], n)
        });
        let mut c = Client {
            source: source.map(|(ip, _)| ip),
            stream: Stream::Plain(tcp),
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
            timeout: plan.timeout,
        };
        if let Some((ip, n)) = source {
            c.write_all(proxy_header(ip, plan.addr, n).as_bytes())
                .await?;
        }
        c.expect(b"", 220).await?;
        c.expect(b"EHLO loadgen.example.org\r\n", 250).await?;
        if let Some(cfg) = &plan.tls {
            c.expect(b"STARTTLS\r\n", 220).await?;
            let Stream::Plain(tcp) = std::mem::replace(&mut c.stream, Stream::Gone) else {
                bail!("STARTTLS twice");
            };
            let connector = futures_rustls::TlsConnector::from(cfg.clone());
            let tls = within(
                plan.timeout,
                connector.connect(plan.server_name.clone(), tcp),
            )
            .await
            .ok_or_else(|| anyhow!("TLS handshake timeout"))?
            .context("TLS handshake")?;
            c.stream = Stream::Tls(Box::new(tls));
            c.start = 0;
            c.end = 0;
            c.expect(b"EHLO loadgen.example.org\r\n", 250).await?;
        }
        if let Some(auth) = &plan.auth {
            c.expect(format!("AUTH PLAIN {auth}\r\n").as_bytes(), 235)
                .await?;
        }
        Ok(c)
    }

    async fn quit(mut self) {
        if self.write_all(b"QUIT\r\n").await.is_ok() {
            let _ = within(Duration::from_secs(5), self.reply()).await;
        }
        match &mut self.stream {
            Stream::Plain(s) => {
                let _ = s.close().await;
            }
            Stream::Tls(s) => {
                let _ = s.close().await;
            }
            Stream::Gone => {}
        }
    }
}

fn body(size: usize, token: &str) -> Vec<u8> {
    let mut b = format!(
        "From: <loadgen@example.org>\r\nTo: <rcpt@example.com>\r\nSubject: load {token}\r\nMessage-ID: <{token}@loadgen>\r\n\r\n"
    )
    .into_bytes();
    let line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!!\r\n";
    while b.len() + line.len() <= size {
        b.extend_from_slice(line);
    }
    while b.len() + 2 < size {
        b.push(b'x');
    }
    b.extend_from_slice(b"\r\n");
    b
}

/// A `--message` file as sent: (for BDAT, dot-stuffed for DATA). It must
/// use CRLF line ends (a signature covers the bytes as they are); a missing
/// final CRLF is added.
fn template(mut raw: Vec<u8>) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    if raw.is_empty() {
        bail!("the message is empty");
    }
    if !raw.ends_with(b"\r\n") {
        raw.extend_from_slice(b"\r\n");
    }
    let mut stuffed = Vec::with_capacity(raw.len() + 16);
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\r\n") {
            bail!("bare LF in the message (lines must end in CRLF)");
        }
        if line.starts_with(b".") {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
    }
    Ok((raw, stuffed))
}

/// The queue id in a 250 reply (`… queued as ID`), if any.
fn queue_id(text: &str) -> String {
    text.split_once("queued as ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(|id| {
            id.trim_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| "-".into())
}

struct Accepted {
    eod: Instant,
    bytes: u64,
    id: String,
    domains: Vec<usize>,
}

/// One transaction. Ok(None): refused (codes recorded); Err: the connection broke.
async fn transaction(
    c: &mut Client,
    plan: &Plan,
    token: &str,
    k: u64,
    rng: &mut Rng,
    codes: &mut Vec<u16>,
) -> anyhow::Result<Option<Accepted>> {
    let size = plan.sizes.pick(rng);
    let domains: Vec<usize> = (0..plan.recipients)
        .map(|r| plan.domain(rng, k, r))
        .collect();
    let msg = match &plan.template {
        Some((raw, stuffed)) => {
            let t = if plan.chunking { raw } else { stuffed };
            let mut m = format!("X-Loadgen-Token: {token}\r\n").into_bytes();
            m.extend_from_slice(t);
            m
        }
        None => body(size, token),
    };
    let payload = if plan.chunking {
        let mut p = format!("BDAT {} LAST\r\n", msg.len()).into_bytes();
        p.extend_from_slice(&msg);
        p
    } else {
        let mut p = msg.clone();
        p.extend_from_slice(b".\r\n");
        p
    };
    let mail = b"MAIL FROM:<loadgen@example.org>\r\n";
    let rcpts: Vec<String> = domains
        .iter()
        .enumerate()
        .map(|(r, d)| format!("RCPT TO:<u{r}-{token}@{}>\r\n", plan.domains[*d]))
        .collect();
    let mut ok_rcpts = Vec::new();
    let eod;
    if plan.pipelining {
        let mut cmds = mail.to_vec();
        for r in &rcpts {
            cmds.extend_from_slice(r.as_bytes());
        }
        if plan.chunking {
            cmds.extend_from_slice(&payload);
        } else {
            cmds.extend_from_slice(b"DATA\r\n");
        }
        c.write_all(&cmds).await?;
        let mut t = Instant::now();
        let (code, _) = c.reply().await?;
        if code != 250 {
            codes.push(code);
        }
        for (r, d) in domains.iter().enumerate() {
            let (code, _) = c.reply().await?;
            if code == 250 || code == 251 {
                ok_rcpts.push(*d);
            } else {
                codes.push(code);
            }
            let _ = r;
        }
        if !plan.chunking {
            let (code, _) = c.reply().await?;
            if code != 354 {
                codes.push(code);
                c.expect(b"RSET\r\n", 250).await?;
                return Ok(None);
            }
            c.write_all(&payload).await?;
            t = Instant::now();
        }
        eod = t;
    } else {
        c.write_all(mail).await?;
        let (code, _) = c.reply().await?;
        if code != 250 {
            codes.push(code);
            c.expect(b"RSET\r\n", 250).await?;
            return Ok(None);
        }
        for (r, d) in domains.iter().enumerate() {
            c.write_all(rcpts[r].as_bytes()).await?;
            let (code, _) = c.reply().await?;
            if code == 250 || code == 251 {
                ok_rcpts.push(*d);
            } else {
                codes.push(code);
            }
        }
        if ok_rcpts.is_empty() {
            c.expect(b"RSET\r\n", 250).await?;
            return Ok(None);
        }
        if !plan.chunking {
            c.write_all(b"DATA\r\n").await?;
            let (code, _) = c.reply().await?;
            if code != 354 {
                codes.push(code);
                c.expect(b"RSET\r\n", 250).await?;
                return Ok(None);
            }
        }
        c.write_all(&payload).await?;
        eod = Instant::now();
    }
    let (code, text) = c.reply().await?;
    if code != 250 {
        codes.push(code);
        if code == 421 {
            bail!("421 {text}");
        }
        return Ok(None);
    }
    if ok_rcpts.is_empty() {
        return Ok(None);
    }
    Ok(Some(Accepted {
        eod,
        bytes: msg.len() as u64,
        id: queue_id(&text),
        domains: ok_rcpts,
    }))
}

const CONNECT_ATTEMPTS: u32 = 5;

async fn connection(plan: Arc<Plan>, i: usize, out: Rc<RefCell<CoreOut>>) {
    let mut rng = Rng(plan.seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let conns = plan.connections as u64;
    let mut client: Option<Client> = None;
    let (mut j, mut on_conn, mut failures) = (0u64, 0u64, 0u32);
    let mut codes = Vec::new();
    loop {
        let k = j * conns + i as u64;
        if plan.limit.is_some_and(|m| k >= m) {
            break;
        }
        let scheduled = plan
            .rate
            .map(|r| plan.start + Duration::from_secs_f64(k as f64 / r));
        if let Some(end) = plan.end {
            if scheduled.unwrap_or_else(Instant::now) >= end {
                break;
            }
        }
        if let Some(t) = scheduled {
            let now = Instant::now();
            if t > now {
                Timer::new(t - now).await;
            }
        }
        if plan.per_connection > 0 && on_conn >= plan.per_connection {
            if let Some(c) = client.take() {
                c.quit().await;
            }
        }
        if client.is_none() {
            on_conn = 0;
            match Client::open(&plan).await {
                Ok(c) => {
                    out.borrow_mut().connects += 1;
                    client = Some(c);
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    {
                        let mut o = out.borrow_mut();
                        o.connection_errors += 1;
                        if let Some(Refused(code, _)) = e.downcast_ref::<Refused>() {
                            *o.codes.entry(*code).or_insert(0) += 1;
                        }
                        if failures >= CONNECT_ATTEMPTS {
                            o.errors.push(format!("connection {i}: {e:#}"));
                        }
                    }
                    if failures >= CONNECT_ATTEMPTS {
                        break;
                    }
                    Timer::new(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let token = format!("lg-{}{i}-{j}", plan.prefix);
        j += 1;
        on_conn += 1;
        let t0 = scheduled.unwrap_or_else(Instant::now);
        codes.clear();
        let c = client.as_mut().expect("connected");
        let source = c.source;
        let result = transaction(c, &plan, &token, k, &mut rng, &mut codes).await;
        let done = Instant::now();
        let mut o = out.borrow_mut();
        o.attempted += 1;
        for code in &codes {
            *o.codes.entry(*code).or_insert(0) += 1;
        }
        if let Some(ip) = source {
            let e = o.sources.entry(ip).or_insert((0, 0));
            match &result {
                Ok(Some(_)) => e.0 += 1,
                Ok(None) => e.1 += 1,
                Err(_) => {}
            }
        }
        match result {
            Ok(Some(a)) => {
                o.accepted += 1;
                o.bytes += a.bytes;
                o.txn
                    .saturating_record(done.duration_since(t0).as_micros() as u64);
                o.eod
                    .saturating_record(done.duration_since(a.eod).as_micros() as u64);
                for d in a.domains {
                    *o.domains.entry(plan.domains[d].clone()).or_insert(0) += 1;
                }
                if plan.ack_log {
                    o.acks.push_str(&token);
                    o.acks.push(' ');
                    o.acks.push_str(&a.id);
                    o.acks.push('\n');
                }
            }
            Ok(None) => o.rejected += 1,
            Err(_) => {
                o.failed += 1;
                o.connection_errors += 1;
                client = None;
            }
        }
    }
    if let Some(c) = client {
        c.quit().await;
    }
}

/// Accepts any server certificate (a load source, not a security check).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_client() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn server_name(target: &str) -> rustls_pki_types::ServerName<'static> {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| rustls_pki_types::ServerName::try_from("localhost").expect("name"))
}

pub fn send(args: SendArgs) -> anyhow::Result<()> {
    let addr = args
        .target
        .to_socket_addrs()
        .with_context(|| format!("--target {}", args.target))?
        .next()
        .ok_or_else(|| anyhow!("--target {}: no address", args.target))?;
    let conns = args.connections.max(1);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cores = if args.cores == 0 { cpus } else { args.cores }.min(conns);
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be > 0");
    }
    if args.recipients == 0 {
        bail!("--recipients must be ≥ 1");
    }
    let limit = match (args.messages, args.duration) {
        (Some(m), _) => Some(m),
        (None, Some(_)) => None,
        (None, None) => Some(10_000),
    };
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let pid = std::process::id();
    let run_id = match args.run_id.as_deref() {
        None | Some("") => None,
        Some("auto") => Some(format!("{:x}{:x}", now_unix.as_millis(), pid)),
        Some(id) => Some(id.to_string()),
    };
    let seed = args
        .seed
        .unwrap_or_else(|| now_unix.as_nanos() as u64 ^ u64::from(pid));
    let domains: Vec<String> = if args.domains == 0 {
        vec![args.domain.clone()]
    } else {
        (0..args.domains).map(|d| format!("d{d}.example")).collect()
    };
    let zipf = match args.domain_dist {
        DomainDist::Zipf(s) if domains.len() > 1 => Some(zipf_cdf(domains.len(), s)),
        _ => None,
    };
    let auth = match &args.auth {
        Some(a) => {
            let (user, pass) = a
                .split_once(':')
                .ok_or_else(|| anyhow!("--auth: expected USER:PASS"))?;
            Some(base64(format!("\0{user}\0{pass}").as_bytes()))
        }
        None => None,
    };
    let sizes = args.size_dist.clone().unwrap_or(SizeDist::Fixed(args.size));
    let template = match &args.message {
        Some(path) => {
            let raw =
                std::fs::read(path).with_context(|| format!("--message {}", path.display()))?;
            Some(template(raw).with_context(|| format!("--message {}", path.display()))?)
        }
        None => None,
    };
    let start = Instant::now();
    let plan = Arc::new(Plan {
        addr,
        server_name: server_name(&args.target),
        tls: if args.starttls {
            Some(tls_client()?)
        } else {
            None
        },
        auth,
        connections: conns,
        limit,
        start,
        end: args.duration.map(|d| start + d),
        rate: args.rate,
        sizes: sizes.clone(),
        recipients: args.recipients,
        domains,
        zipf,
        per_connection: args.per_connection,
        pipelining: !args.no_pipelining,
        chunking: args.chunking,
        prefix: run_id.as_ref().map(|r| format!("{r}-")).unwrap_or_default(),
        seed,
        timeout: args.timeout,
        ack_log: args.ack_log.is_some(),
        template,
        proxy_sources: args.proxy_sources.clone().map(|p| p.0).unwrap_or_default(),
        next_source: AtomicUsize::new(0),
    });

    let mut handles = Vec::new();
    for core in 0..cores {
        let plan = plan.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(core % cpus))
            .name(&format!("send-core-{core}"))
            .io_memory(args.io_memory)
            .spawn(move || async move {
                let out = Rc::new(RefCell::new(CoreOut::new()));
                let tasks: Vec<_> = (core..plan.connections)
                    .step_by(cores)
                    .map(|i| glommio::spawn_local(connection(plan.clone(), i, out.clone())))
                    .collect();
                for t in tasks {
                    t.await;
                }
                Rc::try_unwrap(out)
                    .map(RefCell::into_inner)
                    .unwrap_or_else(|_| CoreOut::new())
            })
            .map_err(|e| anyhow!("starting executor for core {core}: {e}"))?;
        handles.push(handle);
    }
    let mut total = CoreOut::new();
    for (core, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(o) => total.merge(o)?,
            Err(e) => total.errors.push(format!("core {core}: {e}")),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(path) = &args.ack_log {
        std::fs::write(path, &total.acks)
            .with_context(|| format!("--ack-log {}", path.display()))?;
    }
    let (txn, eod) = (&total.txn, &total.eod);
    let pct = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let lat = |h: &Histogram<u64>| serde_json::json!({"p50": pct(h, 0.5), "p90": pct(h, 0.9), "p99": pct(h, 0.99), "p999": pct(h, 0.999), "max": h.max() as f64 / 1000.0});
    let accepted = total.accepted;
    let codes: BTreeMap<String, u64> = total
        .codes
        .iter()
        .map(|(c, n)| (c.to_string(), *n))
        .collect();
    let summary = serde_json::json!({
        "target": args.target,
        "connections": conns,
        "cores": cores,
        "size": args.size,
        "size_dist": sizes.describe(),
        "message": args.message.as_ref().map(|p| p.display().to_string()),
        "recipients": args.recipients,
        "domains": plan.domains.len(),
        "domain_dist": match args.domain_dist { DomainDist::Uniform => "uniform".to_string(), DomainDist::Zipf(s) => format!("zipf:{s}") },
        "pipelining": !args.no_pipelining,
        "chunking": args.chunking,
        "starttls": args.starttls,
        "auth": args.auth.is_some(),
        "rate": args.rate,
        "run_id": run_id,
        "attempted": total.attempted,
        "accepted": accepted,
        "rejected": total.rejected,
        "failed": total.failed,
        "connects": total.connects,
        "connection_errors": total.connection_errors,
        "errors_by_code": codes,
        "worker_errors": total.errors,
        "seconds": secs,
        "bytes": total.bytes,
        "msgs_per_sec": accepted as f64 / secs,
        "bytes_per_sec": total.bytes as f64 / secs,
        "mbytes_per_sec": total.bytes as f64 / secs / 1e6,
        "txn_ms": lat(txn),
        "eod_to_250_ms": lat(eod),
        "accepted_per_domain": total.domains,
        "per_source": total
            .sources
            .iter()
            .map(|(ip, (a, r))| (ip.to_string(), serde_json::json!({"accepted": a, "refused": r})))
            .collect::<BTreeMap<String, serde_json::Value>>(),
    });
    if !args.json {
        eprintln!(
            "accepted {accepted} in {secs:.2}s = {:.0} msg/s, {:.2} MB/s; txn p50 {:.2} ms p99 {:.2} ms; \
             end-of-data→250 p50 {:.2} ms p99 {:.2} ms; rejected {}, failed {}",
            accepted as f64 / secs,
            total.bytes as f64 / secs / 1e6,
            pct(txn, 0.5),
            pct(txn, 0.99),
            pct(eod, 0.5),
            pct(eod, 0.99),
            total.rejected,
            total.failed,
        );
    }
    println!("{summary}");
    if !total.errors.is_empty() {
        bail!(
            "{} worker(s) failed: {}",
            total.errors.len(),
            total.errors[0]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_plain() {
        assert_eq!(base64(b"\0user\0pass"), "AHVzZXIAcGFzcw==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }

    #[test]
    fn zipf_is_skewed_and_normalised() {
        let cdf = zipf_cdf(4, 1.0);
        assert!((cdf[3] - 1.0).abs() < 1e-12);
        assert!(cdf[0] > cdf[1] - cdf[0]);
    }

    #[test]
    fn queue_ids_and_sizes() {
        assert_eq!(queue_id("2.0.0 Ok: queued as ABC123"), "ABC123");
        assert_eq!(queue_id("2.0.0 Ok: queued"), "-");
        let mut rng = Rng(1);
        let d = SizeDist::parse("uniform:10:20").unwrap();
        assert!((0..100).all(|_| (10..=20).contains(&d.pick(&mut rng))));
        let d = SizeDist::parse("5,7").unwrap();
        assert!((0..100).all(|_| [5, 7].contains(&d.pick(&mut rng))));
        assert_eq!(body(1024, "t").len(), 1024);
    }

    #[test]
    fn message_templates_are_dot_stuffed_for_data_only() {
        let (raw, stuffed) = template(b"A: b\r\n\r\n.dot\r\nend".to_vec()).unwrap();
        assert_eq!(raw, b"A: b\r\n\r\n.dot\r\nend\r\n");
        assert_eq!(stuffed, b"A: b\r\n\r\n..dot\r\nend\r\n");
        assert!(template(b"A: b\n\nx\r\n".to_vec()).is_err());
        assert!(template(Vec::new()).is_err());
    }
}
