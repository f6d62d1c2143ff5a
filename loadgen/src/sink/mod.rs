//! `sluice-loadgen sink`: an SMTP/LMTP server that accepts and counts, with fault
//! injection, so loads and failures can be checked end to end.
//!
//! Thread per core on glommio: one pinned executor per core, each binding its own
//! SO_REUSEPORT socket for every `--listen` address, so the kernel spreads the
//! connections. Each core counts into its own `Stats`; readers (the HTTP endpoint,
//! the stats file, the exit summary) ask the cores to merge into shared totals.
//! The protocol itself is the sans-IO `session::Session`; this file only moves
//! bytes, sleeps for injected latency and saves messages.

mod faults;
mod http;
mod session;
mod stats;

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement};

use faults::{Fault, Faults, Greylist};
use session::{Action, Event, Received, Session, SessionConfig};
use stats::{Info, Shared, Stats};

#[derive(clap::Args, Clone, Debug)]
pub struct SinkArgs {
    /// Address to listen on (repeat to play several MX hosts, e.g. 127.0.0.2:25).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:2525")]
    listen: Vec<SocketAddr>,
    /// Executors (pinned, one per core); 0 = every CPU.
    #[arg(long, default_value_t = 0)]
    cores: usize,
    /// Name in the greeting and the EHLO reply.
    #[arg(long, default_value = "sink.loadgen.invalid")]
    hostname: String,
    /// Speak LMTP (LHLO; one reply per recipient after the data).
    #[arg(long)]
    lmtp: bool,
    /// PEM certificate chain: offers STARTTLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Offer AUTH PLAIN and LOGIN and accept any credentials.
    #[arg(long)]
    auth: bool,
    /// SIZE limit in bytes (0 = none).
    #[arg(long, default_value_t = 0)]
    max_size: u64,
    /// Recipients per message before 452 4.5.3.
    #[arg(long, default_value_t = 1000)]
    max_recipients: usize,
    /// Fault injection, repeatable:
    /// `at=rcpt|data,code=NNN,share=20%[,domain=D][,prefix=P][,esc=X.Y.Z][,text=T]`,
    /// `at=rcpt|data,disconnect,share=…` or `at=mid-data,share=…`. Matching faults
    /// at one stage share one draw, in order, so their shares add up.
    #[arg(long = "fault", value_name = "SPEC", value_parser = parse_fault)]
    faults: Vec<Fault>,
    /// Added latency before the greeting.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    delay_greeting: Duration,
    /// Added latency before each RCPT reply.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    delay_rcpt: Duration,
    /// Added latency before the end-of-data reply.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    delay_data: Duration,
    /// Greylist: the first RCPT for each (sender, recipient) gets 451 4.7.1.
    #[arg(long)]
    greylist: bool,
    /// With --greylist: retries sooner than this are refused again.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    greylist_delay: Duration,
    /// Header the per-message token is read from ("<tok@…>" → tok; else last word).
    #[arg(long, default_value = "Message-ID")]
    token_header: String,
    /// Do not keep per-token counts (saves memory on very long runs).
    #[arg(long)]
    no_tokens: bool,
    /// List every token with its count in the JSON summary (GET /tokens always does).
    #[arg(long)]
    report_tokens: bool,
    /// Save every accepted message (exact bytes: unstuffed DATA, raw BDAT) as
    /// CORE-SEQ.eml with its envelope in CORE-SEQ.json.
    #[arg(long, value_name = "DIR")]
    save_dir: Option<PathBuf>,
    /// Serve GET /stats (JSON), GET /tokens and POST /reset over HTTP/1.0 here.
    #[arg(long, value_name = "ADDR")]
    stats_listen: Option<SocketAddr>,
    /// Rewrite this file with the JSON summary every --stats-interval (and at exit).
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
    /// How often --stats-file is rewritten.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    stats_interval: Duration,
    /// Close sessions idle this long (421 4.4.2).
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    idle_timeout: Duration,
    /// Seed for the fault draws (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// io_uring buffer memory per executor, in bytes.
    #[arg(long, default_value_t = 512 * 1024)]
    io_memory: usize,
}

fn parse_fault(s: &str) -> Result<Fault, String> {
    Fault::parse(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// Everything a core's tasks share (single-threaded: Rc, Cell, RefCell).
struct Core {
    id: usize,
    shared: Arc<Shared>,
    cfg: Arc<SessionConfig>,
    stats: RefCell<Stats>,
    tls: Option<futures_rustls::TlsAcceptor>,
    save_dir: Option<Arc<PathBuf>>,
    save_seq: Cell<u64>,
    seeds: RefCell<faults::Rng>,
    idle_timeout: Duration,
    track_tokens: bool,
}

pub fn run(args: SinkArgs) -> anyhow::Result<()> {
    if args.listen.is_empty() {
        bail!("--listen: at least one address is needed");
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cores = if args.cores == 0 { cpus } else { args.cores };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_config(cert, key)?),
        _ => None,
    };
    if let Some(dir) = &args.save_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("--save-dir {}", dir.display()))?;
    }
    let cfg = Arc::new(SessionConfig {
        hostname: args.hostname.clone(),
        lmtp: args.lmtp,
        starttls: tls.is_some(),
        auth: args.auth,
        max_size: args.max_size,
        max_recipients: args.max_recipients.max(1),
        keep_body: args.save_dir.is_some(),
        token_header: args.token_header.clone(),
        faults: Faults {
            list: args.faults.clone(),
        },
        delay_greeting: args.delay_greeting,
        delay_rcpt: args.delay_rcpt,
        delay_data: args.delay_data,
        greylist: args
            .greylist
            .then(|| Arc::new(Greylist::new(args.greylist_delay))),
    });
    let shared = Arc::new(Shared::new(Info {
        listen: args.listen.clone(),
        cores,
        lmtp: args.lmtp,
        report_tokens: args.report_tokens,
        track_tokens: !args.no_tokens,
    }));
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id())
    });

    // Signals first, so one arriving during start-up is not lost.
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;

    let http = match args.stats_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr).with_context(|| format!("--stats-listen {addr}"))?,
        ),
        None => None,
    };

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for core in 0..cores {
        let shared = shared.clone();
        let cfg = cfg.clone();
        let tls = tls.clone();
        let save_dir = args.save_dir.clone().map(Arc::new);
        let listen = args.listen.clone();
        let ready = ready_tx.clone();
        let idle_timeout = args.idle_timeout;
        let track_tokens = !args.no_tokens;
        let core_seed = seed ^ (core as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        LocalExecutorBuilder::new(Placement::Fixed(core % cpus))
            .name(&format!("sink-core-{core}"))
            .io_memory(args.io_memory)
            .spawn(move || async move {
                let ctx = Rc::new(Core {
                    id: core,
                    stats: RefCell::new(Stats::new(listen.len())),
                    shared,
                    cfg,
                    tls: tls.map(futures_rustls::TlsAcceptor::from),
                    save_dir,
                    save_seq: Cell::new(0),
                    seeds: RefCell::new(faults::Rng::new(core_seed)),
                    idle_timeout,
                    track_tokens,
                });
                core_main(ctx, listen, ready).await;
            })
            .map_err(|e| anyhow!("starting executor for core {core}: {e}"))?;
    }
    drop(ready_tx);
    for _ in 0..cores {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!(e),
            Err(_) => bail!("an executor stopped during start-up"),
        }
    }

    if let Some(listener) = http {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("sink-http".into())
            .spawn(move || http::serve(listener, shared))
            .context("starting the stats HTTP thread")?;
    }
    if let Some(path) = args.stats_file.clone() {
        let shared = shared.clone();
        let every = args.stats_interval.max(Duration::from_millis(10));
        std::thread::Builder::new()
            .name("sink-stats-file".into())
            .spawn(move || loop {
                if let Err(e) = write_stats_file(&path, &shared.summary()) {
                    eprintln!("sluice-loadgen sink: writing {}: {e}", path.display());
                }
                std::thread::sleep(every);
            })
            .context("starting the stats file thread")?;
    }
    let addrs: Vec<String> = args.listen.iter().map(|a| a.to_string()).collect();
    eprintln!(
        "sluice-loadgen sink: listening on {} with {cores} core(s){}{}",
        addrs.join(", "),
        if args.lmtp { " (LMTP)" } else { "" },
        args.stats_listen
            .map(|a| format!("; stats on http://{a}/stats"))
            .unwrap_or_default()
    );

    // Wait for SIGTERM/SIGINT, then report and leave.
    let _ = signals.forever().next();
    let summary = shared.summary();
    if let Some(path) = &args.stats_file {
        if let Err(e) = write_stats_file(path, &summary) {
            eprintln!("sluice-loadgen sink: writing {}: {e}", path.display());
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{summary}");
    let _ = out.flush();
    std::process::exit(0);
}

fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        bail!("--tls-cert {}: no certificate found", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

fn write_stats_file(path: &Path, summary: &serde_json::Value) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{summary}\n"))?;
    std::fs::rename(&tmp, path)
}

async fn core_main(
    core: Rc<Core>,
    listen: Vec<SocketAddr>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut sockets = Vec::new();
    for addr in &listen {
        match TcpListener::bind(addr) {
            Ok(s) => sockets.push(s),
            Err(e) => {
                let _ = ready.send(Err(format!("--listen {addr}: cannot bind: {e}")));
                return;
            }
        }
    }
    for (idx, sock) in sockets.into_iter().enumerate() {
        let core = core.clone();
        glommio::spawn_local(async move {
            loop {
                match sock.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(serve(stream, idx, core.clone())).detach();
                    }
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        eprintln!("sluice-loadgen sink: accept: {e}");
                        Timer::new(Duration::from_millis(50)).await;
                    }
                }
            }
        })
        .detach();
    }
    let _ = ready.send(Ok(()));

    // Merge this core's counts into the totals when a reader asks (within a few
    // milliseconds) and at least once a second while anything changes.
    let mut answered = 0u64;
    let mut last = Instant::now();
    loop {
        Timer::new(Duration::from_millis(10)).await;
        let request = core.shared.flush_request.load(Ordering::SeqCst);
        let periodic = last.elapsed() >= Duration::from_secs(1) && !core.stats.borrow().is_empty();
        if request > answered || periodic {
            let delta = core.stats.borrow_mut().take();
            if core.shared.merge_from_core(core.id, delta, request) {
                core.stats.borrow_mut().max_messages_per_connection = 0;
            }
            answered = request;
            last = Instant::now();
        }
    }
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<futures_rustls::server::TlsStream<TcpStream>>),
    /// Transient, while the TLS handshake owns the stream.
    Gone,
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(data).await,
            Conn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn close(&mut self) {
        match self {
            Conn::Plain(s) => {
                let _ = s.close().await;
            }
            Conn::Tls(s) => {
                let _ = s.close().await;
            }
            Conn::Gone => {}
        }
    }
}

/// Keeps the shared session gauge right however the session ends.
struct Gauge(Arc<Shared>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.session_closed();
    }
}

const READ_BUFFER: usize = 64 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Races a future against a timer; None when the timer wins.
async fn within<T>(dur: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        Timer::new(dur).await;
        None
    })
    .await
}

async fn serve(stream: TcpStream, listener: usize, core: Rc<Core>) {
    let _ = stream.set_nodelay(true);
    core.shared.session_opened();
    let _gauge = Gauge(core.shared.clone());
    core.stats.borrow_mut().connections += 1;
    let seed = core.seeds.borrow_mut().next_u64();
    let mut session = Session::new(core.cfg.clone(), seed);
    let mut conn = Conn::Plain(stream);
    let mut per_conn = 0u64;
    if let Some(d) = session.greeting_delay() {
        Timer::new(d).await;
    }
    session.greeting();
    let _ = drive(&mut conn, &mut session, &core, listener, &mut per_conn).await;
    // Whatever ended the session, count what it saw.
    let _ = flush(
        &mut Conn::Gone,
        &mut session,
        &core,
        listener,
        &mut per_conn,
    )
    .await;
    conn.close().await;
}

async fn drive(
    conn: &mut Conn,
    session: &mut Session,
    core: &Core,
    listener: usize,
    per_conn: &mut u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; READ_BUFFER];
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        while start < end {
            let (used, action) = session.receive(&buf[start..end]);
            start += used;
            match action {
                Action::Read => break,
                Action::Delay(d) => {
                    flush(conn, session, core, listener, per_conn).await?;
                    Timer::new(d).await;
                    if session.has_pending() && session.resume() == Action::Close {
                        flush(conn, session, core, listener, per_conn).await?;
                        return Ok(());
                    }
                }
                Action::Close => {
                    flush(conn, session, core, listener, per_conn).await?;
                    return Ok(());
                }
                Action::StartTls => {
                    flush(conn, session, core, listener, per_conn).await?;
                    // Bytes pipelined after STARTTLS came in clear text: dropped.
                    start = 0;
                    end = 0;
                    let Some(acceptor) = &core.tls else {
                        return Ok(());
                    };
                    let Conn::Plain(tcp) = std::mem::replace(conn, Conn::Gone) else {
                        return Ok(());
                    };
                    match within(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Some(Ok(tls)) => {
                            *conn = Conn::Tls(Box::new(tls));
                            session.tls_started();
                        }
                        _ => return Ok(()),
                    }
                }
            }
        }
        // Keep an incomplete command line (bounded by MAX_LINE) for the next read.
        if start < end {
            buf.copy_within(start..end, 0);
            end -= start;
        } else {
            end = 0;
        }
        start = 0;
        flush(conn, session, core, listener, per_conn).await?;
        if session.is_closed() {
            return Ok(());
        }
        let n = match within(core.idle_timeout, conn.read(&mut buf[end..])).await {
            Some(r) => r?,
            None => {
                let _ = conn.write_all(b"421 4.4.2 Idle timeout, closing\r\n").await;
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}

/// Counts the session's events (saving messages when asked), then writes its
/// replies: a 250 never leaves before its message is counted (and saved).
async fn flush(
    conn: &mut Conn,
    session: &mut Session,
    core: &Core,
    listener: usize,
    per_conn: &mut u64,
) -> std::io::Result<()> {
    if session.has_events() {
        let mut to_save = Vec::new();
        {
            let mut st = core.stats.borrow_mut();
            for ev in session.take_events() {
                match ev {
                    Event::Message(m) => {
                        st.message(&m, listener, core.track_tokens);
                        *per_conn += 1;
                        st.max_messages_per_connection =
                            st.max_messages_per_connection.max(*per_conn);
                        if core.save_dir.is_some() {
                            to_save.push(m);
                        }
                    }
                    Event::Rejected { stage, code } => {
                        *st.rejected.entry((stage, code)).or_insert(0) += 1
                    }
                    Event::Greylisted => st.greylisted += 1,
                    Event::Disconnected(stage) => *st.disconnects.entry(stage).or_insert(0) += 1,
                    Event::Tls => st.tls_sessions += 1,
                }
            }
        }
        if let Some(dir) = &core.save_dir {
            for m in to_save {
                let seq = core.save_seq.get();
                core.save_seq.set(seq + 1);
                let name = format!("{}-{seq:010}", core.id);
                let listen = core.shared.info.listen[listener];
                let dir = dir.clone();
                let result = glommio::executor()
                    .spawn_blocking(move || save(&dir, &name, &m, listen))
                    .await;
                if let Err(e) = result {
                    eprintln!("sluice-loadgen sink: saving a message: {e}");
                }
            }
        }
    }
    if !session.output().is_empty() {
        let result = conn.write_all(session.output()).await;
        session.clear_output();
        result?;
    }
    Ok(())
}

/// NAME.eml holds the message bytes; NAME.json the envelope, written last (via a
/// rename) so a reader that sees the JSON also sees the whole message.
fn save(dir: &Path, name: &str, m: &Received, listen: SocketAddr) -> std::io::Result<()> {
    std::fs::write(dir.join(format!("{name}.eml")), &m.body)?;
    let envelope = serde_json::json!({
        "from": m.from,
        "rcpts": m.rcpts,
        "listener": listen.to_string(),
        "bytes": m.bytes,
        "bdat": m.bdat,
        "token": m.token,
        "eml": format!("{name}.eml"),
    });
    let tmp = dir.join(format!("{name}.json.tmp"));
    std::fs::write(&tmp, format!("{envelope}\n"))?;
    std::fs::rename(tmp, dir.join(format!("{name}.json")))
}
