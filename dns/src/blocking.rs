//! One-shot blocking lookups for threads that are not executors (the MTA-STS
//! management thread refreshes policies with no delivery, and so no executor,
//! asking). The same sans-IO core as [`crate::Resolver`] (`build_query`,
//! `parse_answer`): UDP to each configured server in turn, TCP when the answer
//! is truncated, `attempts` rounds. No cache and no in-flight sharing: callers
//! ask rarely. Never call this on an executor.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Instant;

use crate::resolver::ResolveError;
use crate::{build_query, parse_answer, Answer, DnsError, QueryType, Record};
use crate::{NegativeKind, ResolverConfig};

const UDP_BUFFER: usize = 4096;

/// The answer to `name`/`qtype` from the first configured server that gives
/// one (NXDOMAIN and NODATA are answers, see [`Answer::negative`]).
pub fn lookup_blocking(
    config: &ResolverConfig,
    name: &str,
    qtype: QueryType,
) -> Result<Answer, ResolveError> {
    if config.servers.is_empty() {
        return Err(ResolveError::NoServers);
    }
    let mut worst: Option<ResolveError> = None;
    for _ in 0..config.attempts.max(1) {
        for server in &config.servers {
            match ask(config, *server, name, qtype) {
                Ok(answer) => return Ok(answer),
                // A bad name will not get better at another server.
                Err(e @ ResolveError::InvalidName { .. }) => return Err(e),
                Err(e) => {
                    if worst.as_ref().is_none_or(|w| *w == ResolveError::Timeout) {
                        worst = Some(e);
                    }
                }
            }
        }
    }
    Err(worst.unwrap_or(ResolveError::Timeout))
}

/// The addresses of `name` (A and AAAA as `config.ip_preference` allows, in
/// its order; a CNAME chain in the answer is followed). Empty when the name
/// has none; an error only when no family could be asked.
pub fn addresses_blocking(
    config: &ResolverConfig,
    name: &str,
) -> Result<Vec<IpAddr>, ResolveError> {
    let mut addrs = Vec::new();
    let mut failure = None;
    let mut answered = false;
    for &qtype in config.ip_preference.query_types() {
        match lookup_blocking(config, name, qtype) {
            Ok(answer) => {
                answered = true;
                for ip in answer.records.iter().filter_map(Record::ip_addr) {
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    match failure {
        Some(e) if !answered => Err(e),
        _ => Ok(addrs),
    }
}

fn ask(
    config: &ResolverConfig,
    server: SocketAddr,
    name: &str,
    qtype: QueryType,
) -> Result<Answer, ResolveError> {
    let id: u16 = rand::random();
    let query = build_query(id, name, qtype)?;
    let answer = udp(config, server, id, name, qtype, &query)?;
    if answer.truncated {
        return tcp(config, server, id, name, qtype, &query);
    }
    Ok(answer)
}

fn io(e: std::io::Error) -> ResolveError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ResolveError::Timeout,
        _ => ResolveError::Io(e.to_string()),
    }
}

fn udp(
    config: &ResolverConfig,
    server: SocketAddr,
    id: u16,
    name: &str,
    qtype: QueryType,
    query: &[u8],
) -> Result<Answer, ResolveError> {
    let local: SocketAddr = if server.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).map_err(io)?;
    // Connected: the kernel drops datagrams from any other address.
    socket.connect(server).map_err(io)?;
    socket.send(query).map_err(io)?;
    let deadline = Instant::now() + config.timeout;
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ResolveError::Timeout);
        }
        socket.set_read_timeout(Some(left)).map_err(io)?;
        let len = socket.recv(&mut buf).map_err(io)?;
        let datagram = buf.get(..len).unwrap_or_default();
        if len >= buf.len() {
            // Possibly cut by the kernel: ask again over TCP.
            return Ok(Answer {
                records: Vec::new(),
                truncated: true,
                authentic_data: false,
                negative: None::<NegativeKind>,
                min_ttl: 0,
            });
        }
        match parse_answer(id, name, qtype, datagram) {
            Ok(answer) => return Ok(answer),
            // Late or forged: keep waiting for ours.
            Err(DnsError::IdMismatch { .. } | DnsError::QuestionMismatch) => continue,
            Err(other) => return Err(other.into()),
        }
    }
}

fn tcp(
    config: &ResolverConfig,
    server: SocketAddr,
    id: u16,
    name: &str,
    qtype: QueryType,
    query: &[u8],
) -> Result<Answer, ResolveError> {
    let mut stream = TcpStream::connect_timeout(&server, config.timeout).map_err(io)?;
    stream.set_read_timeout(Some(config.timeout)).map_err(io)?;
    stream.set_write_timeout(Some(config.timeout)).map_err(io)?;
    let len =
        u16::try_from(query.len()).map_err(|_| ResolveError::Malformed("query too long".into()))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).map_err(io)?;
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).map_err(io)?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream.read_exact(&mut message).map_err(io)?;
    let mut answer = parse_answer(id, name, qtype, &message)?;
    answer.truncated = false;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn no_servers_is_an_error() {
        let config = ResolverConfig::default();
        assert_eq!(
            lookup_blocking(&config, "example.com", QueryType::A),
            Err(ResolveError::NoServers)
        );
    }

    /// A server that never answers: every round times out, within the
    /// configured bound per server and attempt.
    #[test]
    fn a_silent_server_times_out() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = ResolverConfig {
            servers: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_millis(100),
            attempts: 2,
            ..ResolverConfig::default()
        };
        let started = Instant::now();
        assert_eq!(
            addresses_blocking(&config, "mta-sts.example.com"),
            Err(ResolveError::Timeout)
        );
        // Two families × two attempts × 100 ms.
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// A UDP server on loopback that first sends a datagram with a wrong id
    /// (ignored), then the answer: a CNAME to a name with one A record for
    /// A queries, NODATA for AAAA. The chain is followed.
    #[test]
    fn answers_through_a_cname_ignoring_a_forged_datagram() {
        use hickory_proto::op::{Message, MessageType};
        use hickory_proto::rr::rdata::{A, CNAME};
        use hickory_proto::rr::{Name, RData, Record as WireRecord, RecordType};

        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            for _ in 0..2 {
                let (len, from) = server.recv_from(&mut buf).unwrap();
                let query = Message::from_vec(&buf[..len]).unwrap();
                let mut reply = Message::new();
                reply
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_recursion_desired(true)
                    .set_recursion_available(true)
                    .add_queries(query.queries().to_vec());
                if query.queries()[0].query_type() == RecordType::A {
                    let alias = Name::from_ascii("mta-sts.example.com.").unwrap();
                    let target = Name::from_ascii("sts.host.example.").unwrap();
                    reply.add_answer(WireRecord::from_rdata(
                        alias,
                        60,
                        RData::CNAME(CNAME(target.clone())),
                    ));
                    reply.add_answer(WireRecord::from_rdata(
                        target,
                        60,
                        RData::A(A::new(192, 0, 2, 7)),
                    ));
                }
                let mut forged = reply.clone();
                forged.set_id(query.id().wrapping_add(1));
                server.send_to(&forged.to_vec().unwrap(), from).unwrap();
                server.send_to(&reply.to_vec().unwrap(), from).unwrap();
            }
        });
        let config = ResolverConfig {
            servers: vec![addr],
            timeout: Duration::from_secs(5),
            ..ResolverConfig::default()
        };
        assert_eq!(
            addresses_blocking(&config, "mta-sts.example.com"),
            Ok(vec!["192.0.2.7".parse::<IpAddr>().unwrap()])
        );
        thread.join().unwrap();
    }
}
