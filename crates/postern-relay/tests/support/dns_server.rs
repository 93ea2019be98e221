//! A small authoritative DNS server for tests: one zone from a list of records, served over UDP
//! and TCP on the same ephemeral loopback port, on its own thread with a tokio runtime.
//!
//! It answers like a real authoritative server where the tests need it: the records asked for,
//! CNAME chains inside the zone, NOERROR with the SOA when the name exists without that type
//! (including empty non-terminals), NXDOMAIN with the SOA for names in the zone with no records,
//! REFUSED outside the zone. UDP answers larger than the client's EDNS size (512 without EDNS)
//! are truncated (TC set, no records), so clients must retry over TCP. Two names misbehave on
//! purpose: `servfail.<zone>` answers SERVFAIL and `silent.<zone>` is never answered;
//! `v4only.<zone>` answers A queries from its records and never answers AAAA ones;
//! `slowv4.<zone>` answers A queries [`SLOW_ANSWER`] late (AAAA ones at once); `nxv6silent.<zone>`
//! (give it no records) answers A queries NXDOMAIN and never answers AAAA ones. Records
//! owned by names under `stray.<zone>` are never answered for their own names: they are
//! added, those of the type asked for, to every answer that has records, as a forwarder
//! that passes other names' records on (or a spoofer) would. Once told
//! ([`TestDns::fail_everything`]), every name in the zone answers SERVFAIL; a zone started
//! with [`TestDns::start_uncached`] gives its records a TTL of 0, so that every lookup asks,
//! and one started with [`TestDns::start_with_ttl`] the TTL given. [`TestDns::replace`] puts
//! other records in place of the zone's, as a zone edited and reloaded.
//!
//! Self-contained (hickory-proto, tokio with `rt`, `net`, `sync`, `macros`, and std) so other
//! crates' tests can include it with `#[path = "..."] mod dns_server;`.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// The TTL of every served record, and the SOA minimum (negative-caching TTL).
const TTL: u32 = 60;

/// The largest UDP answer for a query without EDNS (RFC 1035 section 4.2.1).
const PLAIN_UDP_LIMIT: usize = 512;

/// How late `slowv4.<zone>`'s A answers come.
pub const SLOW_ANSWER: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest CNAME chain followed inside the zone for one answer.
const MAX_CNAME_CHAIN: usize = 8;

/// One record of the zone, owned by a name relative to the zone (`"mx1"`, `"@"` for the apex)
/// or absolute (`"mx1.example.net."`). Targets are read the same way; `"."` is the root (a null
/// MX is `Rec::Mx(0, ".")`).
#[derive(Debug, Clone)]
pub enum Rec {
    /// An MX record: preference and exchange.
    Mx(u16, &'static str),
    /// An A record.
    A(Ipv4Addr),
    /// An AAAA record.
    Aaaa(Ipv6Addr),
    /// A CNAME record: the canonical name.
    Cname(&'static str),
    /// A TXT record (a name that exists with neither MX nor address records).
    Txt(&'static str),
}

/// A running server; it stops and its thread is joined when dropped.
pub struct TestDns {
    /// The loopback address serving both UDP and TCP.
    pub addr: SocketAddr,
    zone: Arc<Zone>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The zone's data and counters, shared by the server's tasks.
struct Zone {
    origin: Name,
    records: std::sync::Mutex<Vec<Record>>,
    ttl: u32,
    soa: Record,
    servfail: Name,
    silent: Name,
    v4only: Name,
    slowv4: Name,
    nxv6silent: Name,
    stray: Name,
    udp_queries: AtomicUsize,
    tcp_queries: AtomicUsize,
    /// Every name answers SERVFAIL.
    failing: std::sync::atomic::AtomicBool,
}

impl TestDns {
    /// Starts serving `zone` with `records` on `127.0.0.1:<ephemeral>`. Panics on bad names or
    /// when no port can be bound for both UDP and TCP.
    pub fn start(zone: &str, records: &[(&str, Rec)]) -> TestDns {
        Self::start_with_ttl(zone, records, TTL)
    }

    /// As [`TestDns::start`], with every record's TTL (and the negative-caching TTL) 0: no
    /// answer is kept by a resolver's cache.
    pub fn start_uncached(zone: &str, records: &[(&str, Rec)]) -> TestDns {
        Self::start_with_ttl(zone, records, 0)
    }

    /// From now on every name in the zone answers SERVFAIL (a broken zone or resolver).
    pub fn fail_everything(&self) {
        self.zone.failing.store(true, Ordering::SeqCst);
    }

    /// Undoes [`TestDns::fail_everything`]: the zone answers from its records again.
    pub fn answer_again(&self) {
        self.zone.failing.store(false, Ordering::SeqCst);
    }

    /// From now on the zone holds `records` (and whatever the names below say) instead.
    pub fn replace(&self, records: &[(&str, Rec)]) {
        let records = build_records(&self.zone.origin, records, self.zone.ttl);
        *self.zone.records.lock().unwrap() = records;
    }

    /// As [`TestDns::start`], with `ttl` for every record and for negative answers.
    pub fn start_with_ttl(zone: &str, records: &[(&str, Rec)], ttl: u32) -> TestDns {
        let mut origin = Name::from_utf8(zone).expect("zone name");
        origin.set_fqdn(true);
        let name = |text: &str| name_in(&origin, text);
        let records = build_records(&origin, records, ttl);
        let soa = Record::from_rdata(
            origin.clone(),
            ttl,
            RData::SOA(SOA::new(
                name("ns"),
                name("hostmaster"),
                1,
                3600,
                600,
                86400,
                ttl,
            )),
        );
        let zone = Arc::new(Zone {
            servfail: name("servfail"),
            silent: name("silent"),
            v4only: name("v4only"),
            slowv4: name("slowv4"),
            nxv6silent: name("nxv6silent"),
            stray: name("stray"),
            origin,
            records: std::sync::Mutex::new(records),
            ttl,
            soa,
            udp_queries: AtomicUsize::new(0),
            tcp_queries: AtomicUsize::new(0),
            failing: false.into(),
        });

        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("local address");
        udp.set_nonblocking(true).expect("nonblocking UDP");
        tcp.set_nonblocking(true).expect("nonblocking TCP");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let served = zone.clone();
        let thread = std::thread::Builder::new()
            .name("test-dns".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                runtime.block_on(async move {
                    let udp = tokio::net::UdpSocket::from_std(udp).expect("tokio UDP");
                    let tcp = tokio::net::TcpListener::from_std(tcp).expect("tokio TCP");
                    tokio::select! {
                        _ = stopped => {}
                        () = serve_udp(udp, served.clone()) => {}
                        () = serve_tcp(tcp, served) => {}
                    }
                });
            })
            .expect("DNS server thread");
        TestDns {
            addr,
            zone,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Queries received over UDP and TCP together.
    pub fn query_count(&self) -> usize {
        self.udp_query_count() + self.tcp_query_count()
    }

    /// Queries received over UDP.
    pub fn udp_query_count(&self) -> usize {
        self.zone.udp_queries.load(Ordering::SeqCst)
    }

    /// Queries received over TCP.
    pub fn tcp_query_count(&self) -> usize {
        self.zone.tcp_queries.load(Ordering::SeqCst)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `text` as a name: relative to `origin` (`"@"` is the apex) or absolute.
fn name_in(origin: &Name, text: &str) -> Name {
    if text == "@" {
        origin.clone()
    } else {
        // Relaxed for names that IDNA's rules refuse (an underscore inside a label); and
        // then, for names no host has (a space or a NUL in a label), the labels' bytes as
        // they are, relative to the zone.
        Name::parse(text, Some(origin))
            .or_else(|_| Name::from_str_relaxed(text))
            .or_else(|_| {
                Name::from_labels(text.split('.').map(str::as_bytes))?.append_domain(origin)
            })
            .expect("record name")
    }
}

/// The zone's records, each with `ttl`.
fn build_records(origin: &Name, records: &[(&str, Rec)], ttl: u32) -> Vec<Record> {
    let name = |text: &str| name_in(origin, text);
    records
        .iter()
        .map(|(owner, rec)| {
            let data = match rec {
                Rec::Mx(preference, exchange) => RData::MX(MX::new(*preference, name(exchange))),
                Rec::A(addr) => RData::A(A(*addr)),
                Rec::Aaaa(addr) => RData::AAAA(AAAA(*addr)),
                Rec::Cname(target) => RData::CNAME(CNAME(name(target))),
                Rec::Txt(text) => RData::TXT(TXT::new(vec![(*text).to_owned()])),
            };
            Record::from_rdata(name(owner), ttl, data)
        })
        .collect()
}

/// A UDP socket and a TCP listener on the same ephemeral loopback port.
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..64 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        let port = udp.local_addr().expect("local address").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

async fn serve_udp(socket: tokio::net::UdpSocket, zone: Arc<Zone>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        zone.udp_queries.fetch_add(1, Ordering::SeqCst);
        let Ok(request) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let Some(response) = zone.answer(&request) else {
            continue;
        };
        let limit = request
            .edns
            .as_ref()
            .map_or(PLAIN_UDP_LIMIT, |edns| usize::from(edns.max_payload()))
            .max(PLAIN_UDP_LIMIT);
        let Ok(mut bytes) = response.to_vec() else {
            continue;
        };
        if bytes.len() > limit {
            let Ok(truncated) = response.truncate().to_vec() else {
                continue;
            };
            bytes = truncated;
        }
        if zone.answers_late(&request) {
            let socket = socket.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SLOW_ANSWER).await;
                let _ = socket.send_to(&bytes, peer).await;
            });
            continue;
        }
        let _ = socket.send_to(&bytes, peer).await;
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, zone: Arc<Zone>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_tcp_connection(stream, zone.clone()));
    }
}

/// Answers length-prefixed queries (RFC 1035 section 4.2.2) until the client closes.
async fn serve_tcp_connection(stream: tokio::net::TcpStream, zone: Arc<Zone>) {
    loop {
        let mut len = [0u8; 2];
        if !matches!(read_exact(&stream, &mut len).await, Ok(true)) {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(read_exact(&stream, &mut query).await, Ok(true)) {
            return;
        }
        zone.tcp_queries.fetch_add(1, Ordering::SeqCst);
        let Ok(request) = Message::from_vec(&query) else {
            return;
        };
        let Some(response) = zone.answer(&request) else {
            continue;
        };
        let Ok(bytes) = response.to_vec() else {
            return;
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return;
        };
        if zone.answers_late(&request) {
            tokio::time::sleep(SLOW_ANSWER).await;
        }
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        if write_all(&stream, &framed).await.is_err() {
            return;
        }
    }
}

/// Fills `buf`; `Ok(false)` when the peer closed before sending anything.
async fn read_exact(stream: &tokio::net::TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        stream.readable().await?;
        match stream.try_read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

async fn write_all(stream: &tokio::net::TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Zone {
    /// Whether `request`'s answer is sent [`SLOW_ANSWER`] late.
    fn answers_late(&self, request: &Message) -> bool {
        matches!(request.queries.as_slice(),
            [q] if *q.name() == self.slowv4 && q.query_type() == RecordType::A)
    }

    /// The response to `request`, or `None` to stay silent.
    fn answer(&self, request: &Message) -> Option<Message> {
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.add_queries(request.queries.iter().cloned());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            response.set_edns(edns);
        }
        let [query] = request.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return Some(response);
        };
        if request.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
            return Some(response);
        }
        let qname = query.name();
        let qtype = query.query_type();
        if !self.origin.zone_of(qname) {
            response.metadata.response_code = ResponseCode::Refused;
            return Some(response);
        }
        if *qname == self.silent
            || ((*qname == self.v4only || *qname == self.nxv6silent) && qtype == RecordType::AAAA)
        {
            return None;
        }
        if *qname == self.servfail || self.failing.load(Ordering::SeqCst) {
            response.metadata.response_code = ResponseCode::ServFail;
            return Some(response);
        }
        response.metadata.authoritative = true;

        let records = self.records.lock().unwrap().clone();
        let mut current = qname.clone();
        for _ in 0..MAX_CNAME_CHAIN {
            let at_name: Vec<&Record> = records.iter().filter(|r| r.name == current).collect();
            let matching: Vec<Record> = at_name
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .map(|r| (*r).clone())
                .collect();
            if !matching.is_empty() {
                response.add_answers(matching);
                response.add_answers(
                    records
                        .iter()
                        .filter(|r| self.stray.zone_of(&r.name) && r.record_type() == qtype)
                        .cloned(),
                );
                return Some(response);
            }
            let cname = at_name.iter().find_map(|r| match &r.data {
                RData::CNAME(target) => Some(target.0.clone()),
                _ => None,
            });
            if let Some(target) = cname {
                let record = at_name
                    .iter()
                    .find(|r| r.record_type() == RecordType::CNAME)
                    .map(|r| (*r).clone())
                    .expect("the CNAME record just found");
                response.add_answer(record);
                if !self.origin.zone_of(&target) {
                    return Some(response);
                }
                current = target;
                continue;
            }
            let exists = current == self.origin || records.iter().any(|r| current.zone_of(&r.name));
            if !exists {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            response.add_authority(self.soa.clone());
            return Some(response);
        }
        response.metadata.response_code = ResponseCode::ServFail;
        Some(response)
    }
}
