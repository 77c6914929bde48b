//! Hand-built frames for tests: every byte known, so expected flow keys and byte
//! counts are computed, not observed. Plus an AF_PACKET sender that injects them on
//! a host's interface.

use std::{
    ffi::CString,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Result, bail};

use crate::netns::in_netns;

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        for pair in c.chunks(2) {
            let w = if pair.len() == 2 {
                u16::from_be_bytes([pair[0], pair[1]])
            } else {
                u16::from_be_bytes([pair[0], 0])
            };
            sum += w as u32;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet header with optional VLAN tags (outermost first), then `ethertype`.
pub fn eth(dst: [u8; 6], src: [u8; 6], tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub struct V4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub id: u16,
    /// Flags and fragment offset field (e.g. 0x2000 = more fragments, offset 0).
    pub frag: u16,
    /// Options, padded by the caller to a multiple of 4 bytes.
    pub options: Vec<u8>,
}

impl V4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> V4 {
        V4 { src, dst, proto, id: 1, frag: 0, options: Vec::new() }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let ihl = 5 + self.options.len() / 4;
        let total = ihl * 4 + payload.len();
        let mut h = vec![0x40 | ihl as u8, 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.extend_from_slice(&[64, self.proto, 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let c = checksum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// IPv6 header + extension headers (each `(type, body)`, body padded by the
/// caller so that 2 + body is a multiple of 8) + payload.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[(u8, Vec<u8>)], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut ext_bytes = Vec::new();
    for (i, (_, body)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, |e| e.0);
        if exts[i].0 == 44 {
            // Fragment header: fixed 8 bytes, reserved byte instead of a length.
            assert_eq!(body.len(), 6);
            ext_bytes.extend_from_slice(&[next, 0]);
        } else {
            assert_eq!((2 + body.len()) % 8, 0);
            ext_bytes.extend_from_slice(&[next, ((2 + body.len()) / 8 - 1) as u8]);
        }
        ext_bytes.extend_from_slice(body);
    }
    let first = exts.first().map_or(proto, |e| e.0);
    let plen = (ext_bytes.len() + payload.len()) as u16;
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&plen.to_be_bytes());
    h.extend_from_slice(&[first, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&ext_bytes);
    h.extend_from_slice(payload);
    h
}

/// UDP datagram. The checksum is left 0 (legal for IPv4; the datapath never checks).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// TCP segment with a 20-byte header.
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// ICMP echo request.
pub fn icmp_echo(payload: &[u8]) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0, 0, 1, 0, 1];
    i.extend_from_slice(payload);
    let c = checksum(&[&i]);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    i
}

/// A raw AF_PACKET socket bound to an interface inside a namespace.
pub struct RawSender {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawSender {
    pub fn open(ns: &str, ifname: &str) -> Result<RawSender> {
        let ifname = ifname.to_string();
        in_netns(ns, move || -> Result<RawSender> {
            let c = CString::new(ifname.clone())?;
            // SAFETY: plain syscalls; the fd is owned right away.
            unsafe {
                let ifindex = libc::if_nametoindex(c.as_ptr()) as i32;
                if ifindex == 0 {
                    bail!("no interface {ifname}");
                }
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                }
                Ok(RawSender { fd: OwnedFd::from_raw_fd(fd), ifindex })
            }
        })?
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data; sendto reads `frame` only.
        unsafe {
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_ifindex = self.ifindex;
            sa.sll_halen = 6;
            let n = libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if n != frame.len() as isize {
                bail!("sendto: {}", std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// A non-blocking AF_PACKET socket for every frame of `ifname` (in the calling
/// thread's namespace), with a 16 MiB receive buffer.
pub fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let c = CString::new(ifname)?;
    // SAFETY: plain syscalls; the fd is owned right away.
    unsafe {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            proto as i32,
        );
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = libc::if_nametoindex(c.as_ptr()) as i32;
        if sa.sll_ifindex == 0 {
            bail!("no interface {ifname}");
        }
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        if libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_ll).cast(), len) != 0 {
            bail!("bind to {ifname}: {}", std::io::Error::last_os_error());
        }
        let size: libc::c_int = 16 << 20;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            4,
        );
        Ok(fd)
    }
}

/// Every frame arriving on an interface (outgoing ones skipped), as it was on
/// the wire: a VLAN tag the kernel moved into packet metadata is put back.
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    pub fn open(ns: &str, ifname: &str) -> Result<Capture> {
        let ifname = ifname.to_string();
        in_netns(ns, move || -> Result<Capture> {
            let fd = packet_socket(&ifname)?;
            let one: libc::c_int = 1;
            // SAFETY: a socket option on a descriptor we own.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    (&one as *const libc::c_int).cast(),
                    4,
                )
            };
            Ok(Capture { fd })
        })?
    }

    /// Drains what has arrived so far.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65_536];
        let mut cmsg = [0u64; 16];
        loop {
            // SAFETY: recvmsg into owned buffers; control messages are read
            // within the length the kernel reports.
            unsafe {
                let mut sa: libc::sockaddr_ll = std::mem::zeroed();
                let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_name = (&mut sa as *mut libc::sockaddr_ll).cast();
                msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = cmsg.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&cmsg);
                let n = libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0);
                if n < 0 {
                    break;
                }
                if sa.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let mut f = buf[..n as usize].to_vec();
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                        let aux = &*(libc::CMSG_DATA(c) as *const libc::tpacket_auxdata);
                        if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 && f.len() >= 12 {
                            let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                                aux.tp_vlan_tpid
                            } else {
                                TPID_8021Q
                            };
                            let tag = [tpid.to_be_bytes(), aux.tp_vlan_tci.to_be_bytes()].concat();
                            f.splice(12..12, tag);
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
                out.push(f);
            }
        }
        out
    }
}

/// GRE header (RFC 2784/2890) with the optional fields `flags` asks for
/// (checksum 0x8000, key 0x2000, sequence 0x1000; zeros in them), then `payload`.
pub fn gre(flags: u16, proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut g = flags.to_be_bytes().to_vec();
    g.extend_from_slice(&proto.to_be_bytes());
    for bit in [0x8000u16, 0x2000, 0x1000] {
        if flags & bit != 0 {
            g.extend_from_slice(&[0, 0, 0, 1]);
        }
    }
    g.extend_from_slice(payload);
    g
}

/// ERSPAN type II header (version 1, `session`), then the mirrored frame.
pub fn erspan2(session: u16, frame: &[u8]) -> Vec<u8> {
    let mut e = vec![0x10, 0, (session >> 8) as u8 & 0x03, session as u8, 0, 0, 0, 0];
    e.extend_from_slice(frame);
    e
}

/// ERSPAN type III header (version 2, `session`, frame type Ethernet), with
/// the optional 8-byte platform-specific subheader, then the mirrored frame.
pub fn erspan3(session: u16, subheader: bool, frame: &[u8]) -> Vec<u8> {
    let mut e =
        vec![0x20, 0, (session >> 8) as u8 & 0x03, session as u8, 0, 0, 0, 1, 0, 0, 0, subheader as u8];
    if subheader {
        e.extend_from_slice(&[0x10, 0, 0, 0, 0, 0, 0, 0]);
    }
    e.extend_from_slice(frame);
    e
}

/// VXLAN header (RFC 7348) with `flags` (0x08: the VNI is valid), then the frame.
pub fn vxlan(flags: u8, vni: u32, frame: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut x = vec![flags, 0, 0, 0, v[1], v[2], v[3], 0];
    x.extend_from_slice(frame);
    x
}

/// PPPoE session header (RFC 2516) and the PPP protocol, then its payload.
pub fn pppoe(session: u16, ppp_proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x11, 0];
    p.extend_from_slice(&session.to_be_bytes());
    p.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    p.extend_from_slice(&ppp_proto.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// The IP datagram inside an Ethernet frame (after its VLAN tags) and its
/// ethertype, when it carries IPv4 or IPv6.
pub fn l3_of(frame: &[u8]) -> Option<(u16, &[u8])> {
    let mut off = 12;
    loop {
        let t = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
        match t {
            TPID_8021Q | TPID_8021AD => off += 4,
            0x0800 | 0x86dd => return Some((t, &frame[off + 2..])),
            _ => return None,
        }
    }
}
