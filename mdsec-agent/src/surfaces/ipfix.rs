//! IPFIX (RFC 7011) flow export to the collectors network teams run (nfcapd,
//! pmacct's nfacctd, ntopng, ElastiFlow): one record per direction of every
//! conversation that ends (uniflows; RFC 5103 biflows are not written), over
//! UDP or TCP, to one or more collectors, under the configured observation
//! domain.
//!
//! Encoding: IPv4 and IPv6 records under their own template; the template set
//! leads the first message on every UDP socket and TCP connection, and again
//! every `template_refresh_secs` on UDP (RFC 7011 section 8.4). Messages stay
//! under 1,400 bytes so a UDP datagram is never fragmented on a 1,500 MTU.
//!
//! A collector that is down or slow never blocks the poller: records wait in
//! a bounded queue for the export thread; what does not fit is counted
//! (`lost`), and a TCP collector that is down is retried with backoff while
//! its records are counted as failed.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::warn;
use mdsec_common::{app::App, flow::FlowKey, policy::Verdict};
use serde::{Deserialize, Serialize};

use crate::{
    base::clock::Anchor,
    datapath::state::{EndReason, Ended, Side},
};

/// `ipfix:` in the configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IpfixConfig {
    /// `udp://HOST:PORT` or `tcp://HOST:PORT`, one or more.
    pub collectors: Vec<String>,
    /// This gateway's observation domain (RFC 7011 section 3.1).
    #[serde(default)]
    pub observation_domain: u32,
    /// Templates are sent again this often on UDP.
    #[serde(default = "default_refresh")]
    pub template_refresh_secs: u64,
}

fn default_refresh() -> u64 {
    60
}

/// A collector address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collector {
    Udp(String),
    Tcp(String),
}

impl Collector {
    pub fn parse(s: &str) -> Result<Collector, String> {
        let host_port = |rest: &str| crate::base::net::host_port(s, rest);
        if let Some(rest) = s.strip_prefix("udp://") {
            return host_port(rest).map(Collector::Udp);
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return host_port(rest).map(Collector::Tcp);
        }
        Err(format!("`{s}`: a collector must start with udp:// or tcp://"))
    }
}

/// Template ids (data sets carry them; 256 is the first allowed).
pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;

/// applicationName (IE 96) as a fixed-length string, zero-padded: records of
/// one size, which every collector can read or skip.
pub const APP_LEN: u16 = 16;

/// (IE, length) of a template, in record order; the addresses are IE 8/12
/// (4 bytes) or 27/28 (16 bytes).
fn fields(v6: bool) -> [(u16, u16); 16] {
    let (src, dst, len) = if v6 { (27, 28, 16) } else { (8, 12, 4) };
    [
        (1, 8),   // octetDeltaCount
        (2, 8),   // packetDeltaCount
        (152, 8), // flowStartMilliseconds
        (153, 8), // flowEndMilliseconds
        (src, len),
        (dst, len),
        (10, 4),       // ingressInterface
        (7, 2),        // sourceTransportPort
        (11, 2),       // destinationTransportPort
        (58, 2),       // vlanId
        (6, 2),        // tcpControlBits (RFC 7125: 16 bits)
        (56, 6),       // sourceMacAddress
        (4, 1),        // protocolIdentifier
        (136, 1),      // flowEndReason
        (89, 1),       // forwardingStatus
        (96, APP_LEN), // applicationName
    ]
}

/// One direction of a conversation, as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: FlowKey,
    pub mac: [u8; 6],
    pub packets: u64,
    pub bytes: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub tcp_flags: u8,
    /// flowEndReason: 1 idle timeout, 2 active timeout, 3 TCP close, 4 forced
    /// end (the agent stops).
    pub end_reason: u8,
    /// forwardingStatus (RFC 7270): 64 forwarded, 128 dropped.
    pub forwarding: u8,
    pub app: &'static str,
}

impl Record {
    fn v6(&self) -> bool {
        self.key.v4().is_none()
    }

    /// The port fields: for ICMP (whose key holds type and code as ports),
    /// 0 and type × 256 + code, the NetFlow convention collectors decode.
    fn ports(&self) -> (u16, u16) {
        if matches!(self.key.proto, 1 | 58) {
            (0, (self.key.sport << 8) | (self.key.dport & 0xff))
        } else {
            (self.key.sport, self.key.dport)
        }
    }

    fn len(&self) -> usize {
        fields(self.v6()).iter().map(|f| f.1 as usize).sum()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let ms = |t: u64| t.to_be_bytes();
        out.extend_from_slice(&self.bytes.to_be_bytes());
        out.extend_from_slice(&self.packets.to_be_bytes());
        out.extend_from_slice(&ms(self.start_ms));
        out.extend_from_slice(&ms(self.end_ms));
        match (self.key.src_ip(), self.key.dst_ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) if !self.v6() => {
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            _ => {
                out.extend_from_slice(&self.key.src);
                out.extend_from_slice(&self.key.dst);
            }
        }
        out.extend_from_slice(&self.key.ifindex.to_be_bytes());
        let (sport, dport) = self.ports();
        out.extend_from_slice(&sport.to_be_bytes());
        out.extend_from_slice(&dport.to_be_bytes());
        out.extend_from_slice(&self.key.vlan.to_be_bytes());
        out.extend_from_slice(&(self.tcp_flags as u16).to_be_bytes());
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&[self.key.proto, self.end_reason, self.forwarding]);
        let mut app = [0u8; APP_LEN as usize];
        let n = self.app.len().min(app.len());
        app[..n].copy_from_slice(&self.app.as_bytes()[..n]);
        out.extend_from_slice(&app);
    }
}

/// How many records [`records`] makes of `e`.
fn record_count(e: &Ended) -> usize {
    [Some(&e.client), e.server.as_ref()].into_iter().flatten().filter(|s| s.delta.packets > 0).count()
}

/// The uniflow records of a conversation that ended: the client's direction,
/// then the server's if there was one.
pub fn records(e: &Ended, anchor: &Anchor) -> Vec<Record> {
    let ms = |ns: u64| anchor.wall(ns).duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    // RFC 7011 flowEndReason: 1 idle, 2 active timeout, 3 end of flow detected, 4 forced end.
    let reason = match e.reason {
        EndReason::Timeout => 1,
        EndReason::Active => 2,
        EndReason::Closed => 3,
        EndReason::Shutdown => 4,
    };
    [Some(&e.client), e.server.as_ref()]
        .into_iter()
        .flatten()
        // A direction with nothing since its last record has nothing to say.
        .filter(|s| s.delta.packets > 0)
        .map(|s: &Side| {
            // Deltas, as the IEs say: what this record's span counted.
            let t = s.delta;
            Record {
                key: s.key,
                mac: s.mac,
                packets: t.packets,
                bytes: t.bytes,
                start_ms: ms(s.start_ns),
                end_ms: ms(s.rec.last_seen_ns),
                tcp_flags: s.rec.tcp_flags,
                end_reason: reason,
                forwarding: if s.rec.verdict == Verdict::Drop as u8 { 128 } else { 64 },
                app: App::from_u8(s.rec.app).name(),
            }
        })
        .collect()
}

/// The template set of both templates.
pub fn template_set() -> Vec<u8> {
    let mut body = Vec::new();
    for (id, v6) in [(TEMPLATE_V4, false), (TEMPLATE_V6, true)] {
        let f = fields(v6);
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        for (ie, len) in f {
            body.extend_from_slice(&ie.to_be_bytes());
            body.extend_from_slice(&len.to_be_bytes());
        }
    }
    set(2, &body)
}

fn set(id: u16, body: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(body.len() + 4);
    s.extend_from_slice(&id.to_be_bytes());
    s.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
    s.extend_from_slice(body);
    s
}

/// Largest message: a UDP datagram that a 1,500-byte MTU carries whole.
pub const MAX_MESSAGE: usize = 1400;

/// A stream of messages to one collector: its sequence number counts the
/// data records sent before each message (RFC 7011 section 3.1).
pub struct Stream {
    pub domain: u32,
    pub sequence: u32,
}

impl Stream {
    /// Messages carrying `records` (the template set first in the first one when
    /// `templates`), each at most [`MAX_MESSAGE`] bytes.
    pub fn messages(&mut self, records: &[Record], templates: bool, export_secs: u32) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut sets: Vec<u8> = if templates { template_set() } else { Vec::new() };
        let mut count = 0u32;
        let mut i = 0;
        while i < records.len() {
            // One data set per run of records of one template, as many as fit.
            let v6 = records[i].v6();
            let room = MAX_MESSAGE.saturating_sub(16 + sets.len() + 4);
            let mut body = Vec::new();
            let mut n = 0;
            while i < records.len() && records[i].v6() == v6 && body.len() + records[i].len() <= room {
                records[i].encode(&mut body);
                i += 1;
                n += 1;
            }
            if n == 0 {
                if sets.is_empty() {
                    break; // Not reached: a record is far smaller than a message.
                }
                out.push(self.message(&sets, count, export_secs));
                sets.clear();
                count = 0;
                continue;
            }
            sets.extend_from_slice(&set(if v6 { TEMPLATE_V6 } else { TEMPLATE_V4 }, &body));
            count += n;
        }
        if !sets.is_empty() {
            out.push(self.message(&sets, count, export_secs));
        }
        out
    }

    fn message(&mut self, sets: &[u8], records: u32, export_secs: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(16 + sets.len());
        m.extend_from_slice(&10u16.to_be_bytes());
        m.extend_from_slice(&((16 + sets.len()) as u16).to_be_bytes());
        m.extend_from_slice(&export_secs.to_be_bytes());
        m.extend_from_slice(&self.sequence.to_be_bytes());
        m.extend_from_slice(&self.domain.to_be_bytes());
        m.extend_from_slice(sets);
        self.sequence = self.sequence.wrapping_add(records);
        m
    }
}

/// Counters the metrics read.
#[derive(Default)]
pub struct IpfixStats {
    pub records_sent: AtomicU64,
    pub records_failed: AtomicU64,
    /// Records that found the queue full.
    pub records_lost: AtomicU64,
    pub messages_sent: AtomicU64,
}

enum Msg {
    /// A poll's ended conversations, encoded on the export thread.
    Ended(Arc<Vec<Ended>>),
    /// Answer once everything before is sent.
    Flush(mpsc::Sender<()>),
}

/// Hands records to the export thread.
#[derive(Clone)]
pub struct Ipfix {
    tx: mpsc::SyncSender<Msg>,
    stats: Arc<IpfixStats>,
}

/// Batches waiting for the export thread at most (each a poll's ended flows).
const QUEUE: usize = 1024;

impl Ipfix {
    /// Never blocks: a full queue counts the batch's records as lost.
    pub fn send(&self, batch: Arc<Vec<Ended>>) {
        if let Err(
            mpsc::TrySendError::Full(Msg::Ended(b)) | mpsc::TrySendError::Disconnected(Msg::Ended(b)),
        ) = self.tx.try_send(Msg::Ended(batch))
        {
            let n: usize = b.iter().map(record_count).sum();
            self.stats.records_lost.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Waits (at most `timeout`) until everything handed over before is sent.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        let deadline = Instant::now() + timeout;
        let mut msg = Msg::Flush(tx);
        // The queue may be full: wait for room, not past the deadline.
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return false,
            }
        }
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }
}

enum Conn {
    Udp { sock: UdpSocket, last_templates: Option<Instant> },
    Tcp { addr: String, stream: Option<TcpStream>, backoff: crate::base::net::Backoff },
}

struct Target {
    name: String,
    conn: Conn,
    stream: Stream,
}

/// Starts the export thread. Addresses are resolved (UDP sockets connected)
/// here, so a wrong one fails the start; a TCP collector may come later.
pub fn spawn(cfg: &IpfixConfig, stats: Arc<IpfixStats>) -> anyhow::Result<Ipfix> {
    let mut targets = Vec::new();
    for c in &cfg.collectors {
        let conn = match Collector::parse(c).map_err(anyhow::Error::msg)? {
            Collector::Udp(addr) => {
                let to: SocketAddr = addr
                    .to_socket_addrs()
                    .map_err(|e| anyhow::anyhow!("ipfix collector {c}: {e}"))?
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("ipfix collector {c}: no address"))?;
                let sock = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
                sock.connect(to)?;
                Conn::Udp { sock, last_templates: None }
            }
            Collector::Tcp(addr) => Conn::Tcp { addr, stream: None, backoff: Default::default() },
        };
        targets.push(Target {
            name: c.clone(),
            conn,
            stream: Stream { domain: cfg.observation_domain, sequence: 0 },
        });
    }
    let refresh = Duration::from_secs(cfg.template_refresh_secs.max(1));
    let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
    let st = stats.clone();
    std::thread::Builder::new().name("mdsec-ipfix".into()).spawn(move || {
        let mut warned = None::<Instant>;
        for msg in rx {
            let batch = match msg {
                Msg::Ended(b) => {
                    let anchor = Anchor::now();
                    b.iter().flat_map(|e| records(e, &anchor)).collect::<Vec<Record>>()
                }
                Msg::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            let now_secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as u32;
            for t in &mut targets {
                let ok = send(t, &batch, refresh, now_secs);
                let n = batch.len() as u64;
                match ok {
                    Ok(m) => {
                        st.records_sent.fetch_add(n, Ordering::Relaxed);
                        st.messages_sent.fetch_add(m, Ordering::Relaxed);
                    }
                    Err(e) => {
                        st.records_failed.fetch_add(n, Ordering::Relaxed);
                        if warned.is_none_or(|w: Instant| w.elapsed() > Duration::from_secs(10)) {
                            warn!("IPFIX export to {} failed: {e:#}", t.name);
                            warned = Some(Instant::now());
                        }
                    }
                }
            }
        }
    })?;
    Ok(Ipfix { tx, stats })
}

/// Sends one batch to one collector: the number of messages.
fn send(t: &mut Target, batch: &[Record], refresh: Duration, now_secs: u32) -> anyhow::Result<u64> {
    match &mut t.conn {
        Conn::Udp { sock, last_templates } => {
            let due = last_templates.is_none_or(|l| l.elapsed() >= refresh);
            let msgs = t.stream.messages(batch, due, now_secs);
            if due {
                *last_templates = Some(Instant::now());
            }
            for m in &msgs {
                sock.send(m)?;
            }
            Ok(msgs.len() as u64)
        }
        Conn::Tcp { addr, stream, backoff } => {
            let fresh = stream.is_none();
            if fresh {
                if let Err(wait) = backoff.due() {
                    anyhow::bail!("not connected (retrying in {wait:?})");
                }
                let to = addr.to_socket_addrs()?.next().ok_or_else(|| anyhow::anyhow!("no address"))?;
                match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                    Ok(s) => {
                        s.set_write_timeout(Some(Duration::from_secs(2)))?;
                        *stream = Some(s);
                        backoff.connected();
                    }
                    Err(e) => {
                        backoff.failed();
                        return Err(e.into());
                    }
                }
            }
            // A new connection is a new transport session: templates first,
            // and its own sequence.
            if fresh {
                t.stream.sequence = 0;
            }
            let msgs = t.stream.messages(batch, fresh, now_secs);
            let s = stream.as_mut().expect("connected above");
            for m in &msgs {
                if let Err(e) = s.write_all(m) {
                    *stream = None;
                    return Err(e.into());
                }
            }
            Ok(msgs.len() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32, v6: bool) -> Record {
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        if v6 {
            src[0] = 0xfd;
            dst[0] = 0xfd;
            dst[15] = 2;
        } else {
            (src[10], src[11], dst[10], dst[11]) = (0xff, 0xff, 0xff, 0xff);
            (src[12], dst[12], dst[15]) = (10, 10, 2);
        }
        src[13..16].copy_from_slice(&i.to_be_bytes()[1..]);
        Record {
            key: FlowKey { ifindex: 7, vlan: 110, proto: 6, _pad: 0, src, dst, sport: 40000, dport: 2575 },
            mac: [2, 0, 0, 0, 0, 1],
            packets: 10 + i as u64,
            bytes: 1000 + i as u64,
            start_ms: 1_764_000_000_000,
            end_ms: 1_764_000_004_000,
            tcp_flags: 0x1b,
            end_reason: 1,
            forwarding: 64,
            app: "hl7",
        }
    }

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_be_bytes([b[i], b[i + 1]])
    }

    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
    }

    /// Walks a message's sets: (set id, set body) pairs; checks the lengths add up.
    fn sets(m: &[u8]) -> Vec<(u16, Vec<u8>)> {
        assert_eq!(u16_at(m, 0), 10, "version");
        assert_eq!(u16_at(m, 2) as usize, m.len(), "message length");
        let mut out = Vec::new();
        let mut i = 16;
        while i < m.len() {
            let (id, len) = (u16_at(m, i), u16_at(m, i + 2) as usize);
            assert!(len >= 4 && i + len <= m.len(), "set length");
            out.push((id, m[i + 4..i + len].to_vec()));
            i += len;
        }
        out
    }

    #[test]
    fn templates_name_every_field_and_records_match_their_length() {
        let only = Stream { domain: 1, sequence: 0 }.messages(&[], true, 0);
        assert_eq!(only.len(), 1, "templates alone are one message");
        let (id, body) = &sets(&only[0])[0];
        assert_eq!(*id, 2);
        assert_eq!((u16_at(body, 0), u16_at(body, 2)), (TEMPLATE_V4, 16));
        let ies: Vec<u16> = (0..16).map(|f| u16_at(body, 4 + 4 * f)).collect();
        for ie in [1, 2, 4, 6, 7, 8, 10, 11, 12, 56, 58, 89, 96, 136, 152, 153] {
            assert!(ies.contains(&ie), "IE {ie} in the IPv4 template");
        }
        let v6 = &body[4 + 64..];
        assert_eq!((u16_at(v6, 0), u16_at(v6, 2)), (TEMPLATE_V6, 16));
        let ies6: Vec<u16> = (0..16).map(|f| u16_at(v6, 4 + 4 * f)).collect();
        assert!(ies6.contains(&27) && ies6.contains(&28) && !ies6.contains(&8));
        let mut b = Vec::new();
        rec(1, false).encode(&mut b);
        assert_eq!(b.len(), rec(1, false).len());
        let mut b6 = Vec::new();
        rec(1, true).encode(&mut b6);
        assert_eq!(b6.len(), rec(1, true).len());
        assert_eq!(b6.len(), b.len() + 24);
    }

    #[test]
    fn records_split_into_messages_under_the_limit_with_sequence_numbers() {
        let mut s = Stream { domain: 42, sequence: 5 };
        let batch: Vec<Record> = (0..40).map(|i| rec(i, i % 3 == 0)).collect();
        let msgs = s.messages(&batch, true, 1_764_000_000);
        assert!(msgs.len() >= 3, "{} messages", msgs.len());
        let mut seq = 5;
        let mut seen = Vec::new();
        for (n, m) in msgs.iter().enumerate() {
            assert!(m.len() <= MAX_MESSAGE);
            assert_eq!((u32_at(m, 4), u32_at(m, 8), u32_at(m, 12)), (1_764_000_000, seq, 42));
            let mut count = 0;
            for (id, body) in sets(m) {
                match id {
                    2 => assert_eq!(n, 0, "templates lead the first message only"),
                    TEMPLATE_V4 | TEMPLATE_V6 => {
                        let len = rec(0, id == TEMPLATE_V6).len();
                        assert_eq!(body.len() % len, 0);
                        for r in body.chunks(len) {
                            // bytes, packets, then the source address's last byte.
                            let bytes = u64::from_be_bytes(r[0..8].try_into().unwrap());
                            let packets = u64::from_be_bytes(r[8..16].try_into().unwrap());
                            assert_eq!(bytes - 1000, packets - 10);
                            seen.push(packets - 10);
                            count += 1;
                        }
                    }
                    other => panic!("set {other}"),
                }
            }
            seq += count;
        }
        assert_eq!(s.sequence, seq);
        assert_eq!(seen, (0..40).collect::<Vec<u64>>(), "every record once, in order");
        // Without templates and records, nothing is sent.
        assert!(s.messages(&[], false, 0).is_empty());
    }

    #[test]
    fn a_record_carries_its_fields_in_template_order() {
        let mut b = Vec::new();
        let r = rec(3, false);
        r.encode(&mut b);
        assert_eq!(&b[32..36], &[10, 0, 0, 3], "sourceIPv4Address");
        assert_eq!(&b[36..40], &[10, 0, 0, 2], "destinationIPv4Address");
        assert_eq!(u32_at(&b, 40), 7, "ingressInterface");
        assert_eq!((u16_at(&b, 44), u16_at(&b, 46), u16_at(&b, 48)), (40000, 2575, 110));
        assert_eq!(u16_at(&b, 50), 0x1b, "tcpControlBits");
        assert_eq!(&b[52..58], &[2, 0, 0, 0, 0, 1]);
        assert_eq!((b[58], b[59], b[60]), (6, 1, 64));
        assert_eq!(&b[61..64], b"hl7");
        assert!(b[64..77].iter().all(|&c| c == 0));
    }

    /// An independent decoder (the netflow_parser crate) reads the messages
    /// back: templates learnt from the stream, every record's addresses,
    /// ports, protocol and source MAC where this encoder put them.
    #[test]
    fn an_independent_decoder_reads_every_record_back() {
        let mut s = Stream { domain: 9, sequence: 0 };
        let batch: Vec<Record> = (0..30).map(|i| rec(i, i % 4 == 1)).collect();
        let mut parser = netflow_parser::NetflowParser::default();
        let mut got = Vec::new();
        for m in s.messages(&batch, true, 1_764_000_000) {
            let (flows, err) = parser.parse_bytes_as_netflow_common_flowsets(&m);
            assert!(err.is_none(), "{err:?}");
            got.extend(flows);
        }
        assert_eq!(got.len(), batch.len());
        for (f, r) in got.iter().zip(&batch) {
            assert_eq!(f.src_addr, Some(r.key.src_ip()), "{f:?}");
            assert_eq!(f.dst_addr, Some(r.key.dst_ip()), "{f:?}");
            assert_eq!((f.src_port, f.dst_port, f.protocol_number), (Some(40000), Some(2575), Some(6)));
            // The MAC sits after the variable-position address fields: aligned.
            assert_eq!(f.src_mac.as_deref(), Some("02:00:00:00:00:01"), "{f:?}");
        }
    }

    #[test]
    fn collectors_parse_or_say_why_not() {
        assert_eq!(Collector::parse("udp://10.0.0.5:4739"), Ok(Collector::Udp("10.0.0.5:4739".into())));
        assert_eq!(Collector::parse("tcp://[fd00::5]:4739"), Ok(Collector::Tcp("[fd00::5]:4739".into())));
        for bad in ["10.0.0.5:4739", "udp://10.0.0.5", "udp://:4739", "sctp://h:1", "udp://h:0"] {
            assert!(Collector::parse(bad).is_err(), "{bad}");
        }
    }
}
