//! One rtnetlink question: which XDP mode is attached to an interface. Answers the
//! "effective mode" the operator sees in the log and the API; a few lines of raw
//! netlink instead of a netlink crate stack.

use std::{fmt, io, mem::size_of};

const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttached {
    None,
    Driver,
    Skb,
    Hardware,
    Multi,
}

impl fmt::Display for XdpAttached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpAttached::None => "none",
            XdpAttached::Driver => "driver",
            XdpAttached::Skb => "skb",
            XdpAttached::Hardware => "hardware",
            XdpAttached::Multi => "multi",
        })
    }
}

pub fn xdp_attached_mode(ifindex: u32) -> io::Result<XdpAttached> {
    // SAFETY: plain socket syscalls on buffers we own; the fd is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = query(fd, ifindex);
        libc::close(fd);
        r
    }
}

unsafe fn query(fd: i32, ifindex: u32) -> io::Result<XdpAttached> {
    // nlmsghdr (16) + ifinfomsg (16)
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[20..24].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    // SAFETY: (caller) valid fd and buffers.
    if unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: as above.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_reply(&buf[..n as usize])
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn parse_reply(b: &[u8]) -> io::Result<XdpAttached> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short netlink reply");
    let len = u32::from_ne_bytes(b.get(0..4).ok_or_else(bad)?.try_into().unwrap()) as usize;
    let ty = u16_at(b, 4).ok_or_else(bad)?;
    if ty == NLMSG_ERROR {
        let code = i32::from_ne_bytes(b.get(16..20).ok_or_else(bad)?.try_into().unwrap());
        return Err(io::Error::from_raw_os_error(-code));
    }
    let msg = b.get(..len).ok_or_else(bad)?;
    let mut off = 16 + 16;
    while off + 4 <= msg.len() {
        let alen = u16_at(msg, off).ok_or_else(bad)? as usize;
        let aty = u16_at(msg, off + 2).ok_or_else(bad)? & !NLA_F_NESTED;
        if alen < 4 {
            break;
        }
        if aty == IFLA_XDP {
            let nested = msg.get(off + 4..off + alen).ok_or_else(bad)?;
            let mut n = 0;
            while n + 4 <= nested.len() {
                let nlen = u16_at(nested, n).unwrap() as usize;
                if nlen < 4 {
                    break;
                }
                if u16_at(nested, n + 2).unwrap() == IFLA_XDP_ATTACHED {
                    return Ok(match nested.get(n + 4).copied().unwrap_or(0) {
                        1 => XdpAttached::Driver,
                        2 => XdpAttached::Skb,
                        3 => XdpAttached::Hardware,
                        4 => XdpAttached::Multi,
                        _ => XdpAttached::None,
                    });
                }
                n += (nlen + 3) & !3;
            }
        }
        off += (alen + 3) & !3;
    }
    Ok(XdpAttached::None)
}

const _: () = assert!(size_of::<libc::nlmsghdr>() == 16);
