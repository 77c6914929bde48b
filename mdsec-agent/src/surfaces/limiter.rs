//! The API's per-client rate limit.

use std::{collections::HashMap, net::IpAddr, time::Instant};

/// Token bucket per client address. The table is bounded: when full, clients
/// whose bucket has refilled are forgotten (they would start full anyway).
pub struct Limiter {
    per_sec: f64,
    burst: f64,
    clients: HashMap<IpAddr, (f64, Instant)>,
}

/// Client addresses tracked by the limiter.
const LIMITER_CLIENTS: usize = 4096;

impl Limiter {
    pub fn new(per_sec: u32, burst: u32) -> Limiter {
        Limiter { per_sec: per_sec as f64, burst: burst as f64, clients: HashMap::new() }
    }

    /// Takes one token for `ip`; false when the client is over its rate.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.clients.len() >= LIMITER_CLIENTS && !self.clients.contains_key(&ip) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            self.clients
                .retain(|_, (tokens, t)| *tokens + now.duration_since(*t).as_secs_f64() * per_sec < burst);
            if self.clients.len() >= LIMITER_CLIENTS {
                return false;
            }
        }
        let (tokens, t) = self.clients.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*t).as_secs_f64() * self.per_sec).min(self.burst);
        *t = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }
}
