//! Real traffic from host namespaces, and an independent oracle for what crossed a
//! wire: an AF_PACKET tap on the sending interface that sees every outgoing frame.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Result, bail};

use crate::netns::{Host, bind_in, in_netns};

pub fn udp_socket(h: &Host, v6: bool) -> Result<UdpSocket> {
    let bind = SocketAddr::new(h.ip(v6), 0);
    Ok(in_netns(&h.ns, move || UdpSocket::bind(bind))??)
}

/// Sends `count` datagrams of `size` bytes, paced so veth rings never overflow
/// (a ring drop would happen before XDP and falsify exact counts).
pub fn send_udp(sock: &UdpSocket, to: SocketAddr, count: usize, size: usize) -> Result<()> {
    let payload = vec![0x5a; size];
    for i in 0..count {
        sock.send_to(&payload, to)?;
        if i % 32 == 31 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

pub fn udp_receiver(h: &Host, v6: bool, port: u16) -> Result<UdpSocket> {
    let bind = SocketAddr::new(h.ip(v6), port);
    bind_in(&h.ns, move || UdpSocket::bind(bind))
}

pub fn tcp_listener(h: &Host, port: u16) -> Result<TcpListener> {
    let bind = SocketAddr::new(h.ip(false), port);
    bind_in(&h.ns, move || TcpListener::bind(bind))
}

pub fn tcp_connect(h: &Host, to: SocketAddr) -> Result<TcpStream> {
    Ok(in_netns(&h.ns, move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))??)
}

/// A TCP connection from a chosen local port of `h`'s IPv4 address (a client
/// on a low port, which the port rule alone would take for the server).
pub fn tcp_connect_from(h: &Host, local_port: u16, to: SocketAddr) -> Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let local = h.v4();
    let SocketAddr::V4(to) = to else { bail!("tcp_connect_from: IPv4 only") };
    Ok(in_netns(&h.ns, move || -> std::io::Result<TcpStream> {
        let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket calls on a descriptor this closure owns; the
        // addresses are valid sockaddr_in values for the stated length.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let stream = TcpStream::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                4,
            );
            let a = sin(local, local_port);
            if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let b = sin(*to.ip(), to.port());
            if libc::connect(fd, (&b as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(stream)
        }
    })??)
}

/// Counts outgoing frames of one IPv4 5-tuple on a host interface.
pub struct Tap {
    fd: OwnedFd,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub packets: u64,
    pub bytes: u64,
}

impl Tap {
    pub fn open(h: &Host) -> Result<Tap> {
        in_netns(&h.ns, || -> Result<Tap> { Ok(Tap { fd: crate::frames::packet_socket("eth0")? }) })?
    }

    /// Drains the tap and tallies outgoing IPv4 frames of the given TCP/UDP tuple.
    pub fn tally(&self, proto: u8, src: SocketAddr, dst: SocketAddr) -> Tally {
        let mut t = Tally::default();
        let mut buf = vec![0u8; 65_536];
        loop {
            // SAFETY: recvfrom into owned buffers.
            let (n, pkttype) = unsafe {
                let mut sa: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&mut sa as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                );
                (n, sa.sll_pkttype)
            };
            if n < 0 {
                break;
            }
            let n = n as usize;
            if pkttype != libc::PACKET_OUTGOING || n > buf.len() || !matches(&buf[..n], proto, src, dst) {
                continue;
            }
            t.packets += 1;
            t.bytes += n as u64;
        }
        t
    }
}

fn matches(f: &[u8], proto: u8, src: SocketAddr, dst: SocketAddr) -> bool {
    if f.len() < 34 + 4 || f[12..14] != [0x08, 0x00] {
        return false;
    }
    let ip = &f[14..];
    let ihl = (ip[0] & 0xf) as usize * 4;
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        return false;
    };
    if ip[9] != proto || ip[12..16] != s.octets() || ip[16..20] != d.octets() || ip.len() < ihl + 4 {
        return false;
    }
    let l4 = &ip[ihl..];
    u16::from_be_bytes([l4[0], l4[1]]) == src.port() && u16::from_be_bytes([l4[2], l4[3]]) == dst.port()
}

/// Drains a UDP socket without blocking and returns how many datagrams it held.
pub fn drain(sock: &UdpSocket) -> usize {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 65536];
    let mut n = 0;
    while sock.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// Like [`send_udp`] and then waits briefly so in-flight datagrams land.
pub fn send_and_settle(sock: &UdpSocket, to: SocketAddr, count: usize, size: usize) -> Result<()> {
    send_udp(sock, to, count, size)?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

/// Sends `n` datagrams of 64 bytes from host `from` to host `to`:`port` (IPv6 if
/// `v6`); returns how many arrived.
pub fn udp_delivered(
    topo: &crate::netns::Topology,
    from: u8,
    to: u8,
    port: u16,
    n: usize,
    v6: bool,
) -> usize {
    let rx = udp_receiver(topo.host(to), v6, port).unwrap();
    let tx = udp_socket(topo.host(from), v6).unwrap();
    send_and_settle(&tx, SocketAddr::new(topo.host(to).ip(v6), port), n, 64).unwrap();
    drain(&rx)
}

/// A DNS query for `pacs.hospital.internal` (A record).
pub fn dns_query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["pacs", "hospital", "internal"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// One TCP connection from host `from` to host `to`: the client sends `payload`,
/// the server reads it and answers `ok`. Panics if any step fails (a dropped flow).
pub fn tcp_exchange(topo: &crate::netns::Topology, from: u8, to: u8, port: u16, payload: &[u8]) {
    use std::io::{Read, Write};
    let listener = tcp_listener(topo.host(to), port).unwrap();
    let len = payload.len();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"ok").unwrap();
    });
    let mut c = tcp_connect(topo.host(from), SocketAddr::new(topo.host(to).v4().into(), port)).unwrap();
    c.write_all(payload).unwrap();
    let mut back = [0u8; 2];
    c.read_exact(&mut back).unwrap();
    server.join().unwrap();
}
