//! `sluice-loadgen send`: a closed-loop SMTP load source.
//!
//! N connections, each on its own OS thread, send messages back to back with
//! PIPELINING (MAIL, RCPT…, DATA in one write) and report accepted msgs/s and the
//! latency of the whole transaction and of end-of-data → 250, with hdrhistogram.
//! The full thread-per-core source is a later issue; this is enough to load the
//! relay honestly on a small box.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;

#[derive(clap::Args, Clone)]
pub struct SendArgs {
    /// Target host:port.
    #[arg(long, default_value = "127.0.0.1:2525")]
    target: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Total messages (split over the connections).
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Message size in bytes (headers included).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Recipient domain.
    #[arg(long, default_value = "example.com")]
    domain: String,
    /// Messages per connection before QUIT and reconnect (0 = no limit).
    #[arg(long, default_value_t = 0)]
    per_connection: u64,
    /// Print the JSON summary only.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Totals {
    accepted: AtomicU64,
    rejected: AtomicU64,
    bytes: AtomicU64,
}

struct Worker {
    txn: Histogram<u64>,
    eod: Histogram<u64>,
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

fn read_reply(r: &mut BufReader<TcpStream>, line: &mut String) -> anyhow::Result<u16> {
    loop {
        line.clear();
        if r.read_line(line)? == 0 {
            bail!("connection closed");
        }
        if line.len() < 4 {
            bail!("short reply {line:?}");
        }
        if line.as_bytes()[3] != b'-' {
            return line[..3]
                .parse()
                .with_context(|| format!("bad reply {line:?}"));
        }
    }
}

fn connect(
    args: &SendArgs,
    line: &mut String,
) -> anyhow::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream =
        TcpStream::connect(&args.target).with_context(|| format!("connecting {}", args.target))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream.try_clone()?;
    if read_reply(&mut reader, line)? != 220 {
        bail!("greeting: {line}");
    }
    w.write_all(b"EHLO loadgen.example.org\r\n")?;
    if read_reply(&mut reader, line)? != 250 {
        bail!("EHLO: {line}");
    }
    Ok((stream, reader))
}

fn worker(args: SendArgs, id: usize, count: u64, totals: Arc<Totals>) -> anyhow::Result<Worker> {
    let mut out = Worker {
        txn: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        eod: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    };
    let mut line = String::new();
    let (mut stream, mut reader) = connect(&args, &mut line)?;
    let mut on_conn = 0u64;
    for n in 0..count {
        if args.per_connection > 0 && on_conn == args.per_connection {
            stream.write_all(b"QUIT\r\n")?;
            let _ = read_reply(&mut reader, &mut line);
            (stream, reader) = connect(&args, &mut line)?;
            on_conn = 0;
        }
        on_conn += 1;
        let token = format!("lg-{id}-{n}");
        let start = Instant::now();
        let mut cmds = String::from("MAIL FROM:<loadgen@example.org>\r\n");
        for r in 0..args.recipients {
            cmds.push_str(&format!("RCPT TO:<u{r}-{token}@{}>\r\n", args.domain));
        }
        cmds.push_str("DATA\r\n");
        stream.write_all(cmds.as_bytes())?;
        let mut ok = read_reply(&mut reader, &mut line)? == 250;
        let mut rcpt_ok = 0;
        for _ in 0..args.recipients {
            if read_reply(&mut reader, &mut line)? == 250 {
                rcpt_ok += 1;
            }
        }
        ok &= rcpt_ok > 0;
        if read_reply(&mut reader, &mut line)? != 354 {
            totals.rejected.fetch_add(1, Ordering::Relaxed);
            stream.write_all(b"RSET\r\n")?;
            read_reply(&mut reader, &mut line)?;
            continue;
        }
        let mut data = body(args.size, &token);
        data.extend_from_slice(b".\r\n");
        stream.write_all(&data)?;
        let eod = Instant::now();
        let code = read_reply(&mut reader, &mut line)?;
        let done = Instant::now();
        if ok && code == 250 {
            totals.accepted.fetch_add(1, Ordering::Relaxed);
            totals.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            out.txn
                .saturating_record(done.duration_since(start).as_micros() as u64);
            out.eod
                .saturating_record(done.duration_since(eod).as_micros() as u64);
        } else {
            totals.rejected.fetch_add(1, Ordering::Relaxed);
        }
    }
    stream.write_all(b"QUIT\r\n")?;
    let _ = read_reply(&mut reader, &mut line);
    Ok(out)
}

pub fn send(args: SendArgs) -> anyhow::Result<()> {
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let conns = args.connections.max(1);
    let mut handles = Vec::new();
    for i in 0..conns {
        let share =
            args.messages / conns as u64 + u64::from((i as u64) < args.messages % conns as u64);
        let (a, t) = (args.clone(), totals.clone());
        handles.push(std::thread::spawn(move || worker(a, i, share, t)));
    }
    let mut txn = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut eod = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(w)) => {
                txn.add(&w.txn)?;
                eod.add(&w.eod)?;
            }
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push("worker panicked".into()),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let accepted = totals.accepted.load(Ordering::Relaxed);
    let pct = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let summary = serde_json::json!({
        "target": args.target,
        "connections": conns,
        "size": args.size,
        "recipients": args.recipients,
        "accepted": accepted,
        "rejected": totals.rejected.load(Ordering::Relaxed),
        "worker_errors": errors,
        "seconds": secs,
        "msgs_per_sec": accepted as f64 / secs,
        "mbytes_per_sec": totals.bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        "txn_ms": {"p50": pct(&txn, 0.5), "p90": pct(&txn, 0.9), "p99": pct(&txn, 0.99), "p999": pct(&txn, 0.999), "max": txn.max() as f64 / 1000.0},
        "eod_to_250_ms": {"p50": pct(&eod, 0.5), "p90": pct(&eod, 0.9), "p99": pct(&eod, 0.99), "p999": pct(&eod, 0.999), "max": eod.max() as f64 / 1000.0},
    });
    if !args.json {
        eprintln!(
            "accepted {accepted} in {secs:.2}s = {:.0} msg/s; end-of-data→250 p50 {:.2} ms p99 {:.2} ms",
            accepted as f64 / secs,
            pct(&eod, 0.5),
            pct(&eod, 0.99)
        );
    }
    println!("{summary}");
    if !errors.is_empty() {
        bail!("{} worker(s) failed: {}", errors.len(), errors[0]);
    }
    Ok(())
}
