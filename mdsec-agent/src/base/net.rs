//! MAC addresses and protocol names as the agent spells them; the
//! exporters' reconnect backoff.

pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// The protocol number [`proto_name`] spelled `name` as.
pub fn proto_number(name: &str) -> Option<u8> {
    match name {
        "icmp" => Some(1),
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmpv6" => Some(58),
        n => n.parse().ok(),
    }
}

pub fn tcp_flag_names(f: u8) -> Vec<String> {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    (0..8).filter(|b| f & (1 << b) != 0).map(|b| NAMES[b].to_string()).collect()
}

/// `aa:bb:cc:dd:ee:ff` (or `-` separated), exactly six two-digit hex groups.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in s.trim().split([':', '-']) {
        if n == 6 || part.len() != 2 {
            return None;
        }
        mac[n] = u8::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    (n == 6).then_some(mac)
}

pub fn mac_string(m: [u8; 6]) -> String {
    Mac(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly_and_round_trip() {
        let m = parse_mac("58:46:E1:00:00:07").unwrap();
        assert_eq!(mac_string(m), "58:46:e1:00:00:07");
        assert_eq!(parse_mac("58-46-e1-00-00-07"), Some(m));
        for bad in [
            "",
            "58:46:e1:00:00",
            "58:46:e1:00:00:07:08",
            "58:46:zz:00:00:07",
            "5:46:e1:00:00:07",
            "58:46:e1::00:07",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}

/// A MAC address; shown as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl std::fmt::Debug for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        parse_mac(s).map(Mac).ok_or_else(|| format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)"))
    }
}

/// `rest` (what follows a `udp://`-style scheme in `whole`) as HOST:PORT with a
/// non-empty host and a port 1–65535; the error names `whole`.
pub fn host_port(whole: &str, rest: &str) -> Result<String, String> {
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => Ok(rest.to_string()),
        _ => Err(format!("`{whole}`: expected HOST:PORT after the scheme")),
    }
}

/// When a sink that could not connect may try again: 1 s, doubling up to
/// 60 s, back to 1 s once connected. One rule for every exporter that
/// reconnects (IPFIX over TCP, syslog over TCP, the socket sink), so a peer
/// that is down costs no connect per record.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    retry_at: std::time::Instant,
    delay: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { retry_at: std::time::Instant::now(), delay: Backoff::FIRST }
    }
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_secs(1);
    const MAX: std::time::Duration = std::time::Duration::from_secs(60);

    /// Ok when an attempt is due, else how long until it is.
    pub fn due(&self) -> Result<(), std::time::Duration> {
        let now = std::time::Instant::now();
        if now < self.retry_at { Err(self.retry_at - now) } else { Ok(()) }
    }

    /// An attempt failed: the next waits, twice as long as this one did.
    pub fn failed(&mut self) {
        self.retry_at = std::time::Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(Backoff::MAX);
    }

    pub fn connected(&mut self) {
        self.delay = Backoff::FIRST;
    }

    /// The wait the next failure sets.
    pub fn delay(&self) -> std::time::Duration {
        self.delay
    }

    /// Tests: make the next attempt due now.
    #[cfg(test)]
    pub fn expire(&mut self) {
        self.retry_at = std::time::Instant::now();
    }
}

/// This machine's host name (EVE's `host`, the Kafka gateway id by default).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    // RFC 5424 HOSTNAME: printable ASCII without spaces, at most 255; `-` if unknown.
    let clean: String = name.chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    if clean.is_empty() { "-".into() } else { clean }
}
