//! Which end of a flow is the client: the one rule the inventory (a device's
//! client and server apps) and detection (who reached whom) share.
//!
//! In order:
//! 1. ICMP: a request type (echo, timestamp, solicitations) comes from the client.
//! 2. TCP where the datapath saw the handshake: the direction whose kernel entry
//!    a SYN without ACK created is the client's, one a SYN+ACK created the
//!    server's (either direction's creating flags decide both).
//! 3. A flow with no reverse direction anywhere: its sender initiated (nothing
//!    answered it; a scan is this case, whatever its source port).
//! 4. Otherwise (UDP, TCP first seen mid-connection, other protocols): the
//!    port rule, services listen on the lower port; with equal ports the
//!    direction the datapath saw first.
//!
//! Rules 1, 2 and 4 settle a flow's role for good; rule 3 holds until a reverse
//! direction appears.

use mdsec_common::net::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This direction goes from the client to the server.
    Client,
    Server,
}

impl Role {
    pub fn opposite(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// One direction as the rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Side {
    pub proto: u8,
    /// For ICMP: the type.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags of the segment that created its kernel entry (0: not TCP, or unknown).
    pub open_flags: u8,
    pub first_seen_ns: u64,
}

/// The role of `me`, given its reverse direction if the agent holds one; and
/// whether that is final (see the module doc).
pub fn decide(me: &Side, reverse: Option<&Side>) -> (Role, bool) {
    match me.proto {
        IPPROTO_ICMP => return (icmp_role(matches!(me.sport, 8 | 13 | 15 | 17)), true),
        IPPROTO_ICMPV6 => return (icmp_role(matches!(me.sport, 128 | 133 | 135 | 139)), true),
        _ => {}
    }
    if me.proto == IPPROTO_TCP {
        if let Some(r) = handshake(me.open_flags) {
            return (r, true);
        }
        if let Some(r) = reverse.and_then(|rev| handshake(rev.open_flags)) {
            return (r.opposite(), true);
        }
    }
    let Some(rev) = reverse else { return (Role::Client, false) };
    let ports = matches!(me.proto, IPPROTO_TCP | IPPROTO_UDP);
    let role = if ports && me.dport != me.sport {
        if me.dport < me.sport { Role::Client } else { Role::Server }
    } else if me.first_seen_ns != rev.first_seen_ns {
        if me.first_seen_ns < rev.first_seen_ns { Role::Client } else { Role::Server }
    } else {
        // Same ports, same instant: any fixed choice that the two sides agree on.
        if me.sport >= me.dport { Role::Client } else { Role::Server }
    };
    (role, true)
}

fn icmp_role(request: bool) -> Role {
    if request { Role::Client } else { Role::Server }
}

fn handshake(open: u8) -> Option<Role> {
    match (open & SYN != 0, open & ACK != 0) {
        (true, false) => Some(Role::Client),
        (true, true) => Some(Role::Server),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(proto: u8, sport: u16, dport: u16, open: u8, first: u64) -> Side {
        Side { proto, sport, dport, open_flags: open, first_seen_ns: first }
    }

    #[test]
    fn the_handshake_beats_the_ports() {
        // A client using a low source port to a high service port (e.g. 1023 → 8443).
        let c = side(6, 1023, 8443, SYN, 10);
        let s = side(6, 8443, 1023, SYN | ACK, 11);
        assert_eq!(decide(&c, Some(&s)), (Role::Client, true));
        assert_eq!(decide(&s, Some(&c)), (Role::Server, true));
        // The client's direction alone, and the server's answer alone, still know.
        assert_eq!(decide(&c, None), (Role::Client, true));
        assert_eq!(decide(&s, None), (Role::Server, true));
        // Mid-connection on one side: the other side's handshake decides.
        assert_eq!(decide(&side(6, 8443, 1023, ACK, 5), Some(&c)), (Role::Server, true));
    }

    #[test]
    fn without_a_handshake_the_port_rule_and_one_way_flows() {
        let q = side(17, 40000, 53, 0, 20);
        let a = side(17, 53, 40000, 0, 10);
        // The answer seen first (mid-conversation start) does not make it the client.
        assert_eq!(decide(&q, Some(&a)), (Role::Client, true));
        assert_eq!(decide(&a, Some(&q)), (Role::Server, true));
        // A probe from source port 53 that nothing answered: its sender initiated.
        assert_eq!(decide(&side(17, 53, 40000, 0, 1), None), (Role::Client, false));
        // Equal ports: first seen.
        let n1 = side(17, 123, 123, 0, 1);
        let n2 = side(17, 123, 123, 0, 2);
        assert_eq!(decide(&n1, Some(&n2)).0, Role::Client);
        assert_eq!(decide(&n2, Some(&n1)).0, Role::Server);
    }

    #[test]
    fn icmp_requests_are_the_clients() {
        assert_eq!(decide(&side(1, 8, 0, 0, 1), None), (Role::Client, true));
        assert_eq!(decide(&side(1, 0, 0, 0, 1), None), (Role::Server, true));
        assert_eq!(decide(&side(1, 3, 3, 0, 1), None), (Role::Server, true));
        assert_eq!(decide(&side(58, 128, 0, 0, 1), None), (Role::Client, true));
        assert_eq!(decide(&side(58, 129, 0, 0, 1), None), (Role::Server, true));
    }
}
