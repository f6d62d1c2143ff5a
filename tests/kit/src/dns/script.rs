//! A scripted DNS server for fault tests: real UDP and TCP sockets on loopback,
//! answering each query with whatever bytes the test's handler returns —
//! truncated answers, SERVFAIL, silence, wrong ids, answers from another
//! address, garbage. It counts every query it receives. Answers are built by
//! hand (RFC 1035 wire format) so they can be broken on purpose.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A query as received.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: u16,
    /// Lowercase, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    /// The question section (name, type, class) as sent.
    pub question: Vec<u8>,
    pub rd: bool,
    pub tcp: bool,
    pub from: SocketAddr,
}

pub enum Action {
    /// Send these bytes back from the server's own address.
    Send(Vec<u8>),
    /// Send these bytes to the client from another IP on the server's port.
    SendFromOtherIp(Vec<u8>),
    /// Send these bytes to the client from the server's IP but another port.
    SendFromOtherPort(Vec<u8>),
}

pub type Handler = dyn Fn(&Query) -> Vec<Action> + Send + Sync;

pub struct ScriptServer {
    pub addr: SocketAddr,
    udp_count: Arc<AtomicUsize>,
    tcp_count: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Query>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ScriptServer {
    pub fn start(handler: impl Fn(&Query) -> Vec<Action> + Send + Sync + 'static) -> Self {
        let handler: Arc<Handler> = Arc::new(handler);
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("udp addr");
        // Other sources for "answer from the wrong address".
        let other_ip = UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), addr.port()))
            .or_else(|_| UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 3), 0)))
            .expect("bind 127.0.0.2");
        let other_port = UdpSocket::bind("127.0.0.1:0").expect("bind other port");
        let stop = Arc::new(AtomicBool::new(false));
        let udp_count = Arc::new(AtomicUsize::new(0));
        let tcp_count = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));

        let mut threads = Vec::new();
        {
            let (stop, count, log, handler) = (
                stop.clone(),
                udp_count.clone(),
                log.clone(),
                handler.clone(),
            );
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 65_535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some(q) = parse_query(&buf[..n], false, from) else {
                        continue;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    log.lock().expect("log").push(q.clone());
                    for action in handler(&q) {
                        let _ = match action {
                            Action::Send(b) => udp.send_to(&b, from),
                            Action::SendFromOtherIp(b) => other_ip.send_to(&b, from),
                            Action::SendFromOtherPort(b) => other_port.send_to(&b, from),
                        };
                    }
                }
            }));
        }
        {
            let (stop, count, log, handler) =
                (stop.clone(), tcp_count.clone(), log.clone(), handler);
            tcp.set_nonblocking(false).expect("blocking");
            let tcp = Arc::new(tcp);
            threads.push(std::thread::spawn(move || {
                // accept() blocks; Drop wakes it with a connection of its own.
                for stream in tcp.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (count, log, handler) = (count.clone(), log.clone(), handler.clone());
                    std::thread::spawn(move || serve_tcp(stream, &count, &log, &*handler));
                }
            }));
        }
        ScriptServer {
            addr,
            udp_count,
            tcp_count,
            log,
            stop,
            threads,
        }
    }

    pub fn udp_queries(&self) -> usize {
        self.udp_count.load(Ordering::SeqCst)
    }

    pub fn tcp_queries(&self) -> usize {
        self.tcp_count.load(Ordering::SeqCst)
    }

    pub fn queries(&self) -> Vec<Query> {
        self.log.lock().expect("log").clone()
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(
    mut stream: TcpStream,
    count: &AtomicUsize,
    log: &Mutex<Vec<Query>>,
    handler: &Handler,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let from = match stream.peer_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut msg).is_err() {
            return;
        }
        let Some(q) = parse_query(&msg, true, from) else {
            return;
        };
        count.fetch_add(1, Ordering::SeqCst);
        log.lock().expect("log").push(q.clone());
        for action in handler(&q) {
            if let Action::Send(b) = action {
                let mut framed = (b.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&b);
                // Bytes past a u16 length are the test's deliberate lie.
                if stream.write_all(&framed).is_err() {
                    return;
                }
            }
        }
    }
}

fn bind_pair() -> (UdpSocket, TcpListener) {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
}

fn parse_query(b: &[u8], tcp: bool, from: SocketAddr) -> Option<Query> {
    if b.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([b[0], b[1]]);
    let rd = b[2] & 0x01 != 0;
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*b.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(b.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*b.get(pos)?, *b.get(pos + 1)?]);
    let question = b.get(12..pos + 4)?.to_vec();
    Some(Query {
        id,
        name: labels.join("."),
        qtype,
        question,
        rd,
        tcp,
        from,
    })
}

// ---------------------------------------------------------------------------------
// Answer building
// ---------------------------------------------------------------------------------

pub const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_SOA: u16 = 6;
pub const TYPE_MX: u16 = 15;

pub const NOERROR: u8 = 0;
pub const FORMERR: u8 = 1;
pub const SERVFAIL: u8 = 2;
pub const NXDOMAIN: u8 = 3;
pub const REFUSED: u8 = 5;

/// A resource record whose owner is the question name (compression pointer).
pub struct Rr {
    pub rtype: u16,
    pub ttl: u32,
    pub rdata: Vec<u8>,
}

pub fn a(ttl: u32, ip: [u8; 4]) -> Rr {
    Rr {
        rtype: TYPE_A,
        ttl,
        rdata: ip.to_vec(),
    }
}

pub fn mx(ttl: u32, preference: u16, exchange: &str) -> Rr {
    let mut rdata = preference.to_be_bytes().to_vec();
    rdata.extend(encode_name(exchange));
    Rr {
        rtype: TYPE_MX,
        ttl,
        rdata,
    }
}

pub fn cname(ttl: u32, target: &str) -> Rr {
    Rr {
        rtype: TYPE_CNAME,
        ttl,
        rdata: encode_name(target),
    }
}

/// SOA owned by the question name (a zone apex enclosing it, as RFC 2308 wants).
pub fn soa(ttl: u32, minimum: u32) -> Rr {
    let mut rdata = encode_name("ns.script.test");
    rdata.extend(encode_name("hostmaster.script.test"));
    for v in [1u32, 3600, 600, 86400, minimum] {
        rdata.extend(v.to_be_bytes());
    }
    Rr {
        rtype: TYPE_SOA,
        ttl,
        rdata,
    }
}

pub fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend(label.as_bytes());
    }
    out.push(0);
    out
}

/// Response options beyond the records.
#[derive(Default, Clone, Copy)]
pub struct Flags {
    pub rcode: u8,
    pub tc: bool,
    pub ad: bool,
}

pub fn respond(q: &Query, flags: Flags, answers: &[Rr], authority: &[Rr]) -> Vec<u8> {
    respond_with_id(q.id, q, flags, answers, authority)
}

pub fn respond_with_id(
    id: u16,
    q: &Query,
    flags: Flags,
    answers: &[Rr],
    authority: &[Rr],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend(id.to_be_bytes());
    // QR, opcode QUERY, AA, TC?, RD copied.
    let mut b2 = 0x80 | 0x04;
    if flags.tc {
        b2 |= 0x02;
    }
    if q.rd {
        b2 |= 0x01;
    }
    // RA, AD?, rcode.
    let mut b3 = 0x80 | (flags.rcode & 0x0f);
    if flags.ad {
        b3 |= 0x20;
    }
    out.extend([b2, b3]);
    out.extend(1u16.to_be_bytes());
    out.extend((answers.len() as u16).to_be_bytes());
    out.extend((authority.len() as u16).to_be_bytes());
    out.extend(0u16.to_be_bytes());
    out.extend(&q.question);
    for rr in answers.iter().chain(authority) {
        out.extend([0xc0, 0x0c]);
        out.extend(rr.rtype.to_be_bytes());
        out.extend(1u16.to_be_bytes());
        out.extend(rr.ttl.to_be_bytes());
        out.extend((rr.rdata.len() as u16).to_be_bytes());
        out.extend(&rr.rdata);
    }
    out
}

/// A plain A answer with one address, for handlers that just need to answer.
pub fn a_answer(q: &Query, ttl: u32, ip: [u8; 4]) -> Vec<u8> {
    respond(q, Flags::default(), &[a(ttl, ip)], &[])
}
