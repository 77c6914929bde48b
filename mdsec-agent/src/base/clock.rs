//! The datapath stamps with `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE: one
//! jiffy of resolution, but a plain read instead of a clocksource read, which was a
//! fifth of the per-packet cost); the API speaks RFC 3339 wall-clock time.

use std::time::{Duration, SystemTime};

/// Now on the datapath's clock. The coarse clock itself, not CLOCK_MONOTONIC: the
/// precise clock runs up to a jiffy ahead, so a stamp taken here could otherwise be
/// later than the kernel's stamp of a packet sent afterwards.
pub fn mono_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into ts.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts datapath stamps to wall-clock time, anchored once per poll.
#[derive(Clone, Copy, Debug)]
pub struct Anchor {
    wall: SystemTime,
    mono_ns: u64,
}

impl Anchor {
    /// Anchored on the precise CLOCK_MONOTONIC, which the coarse clock trails by
    /// less than a jiffy: conversions then agree between anchors to the
    /// millisecond, where a coarse anchor would jitter by a jiffy.
    pub fn now() -> Anchor {
        Anchor { wall: SystemTime::now(), mono_ns: read(libc::CLOCK_MONOTONIC) }
    }

    pub fn mono_ns(&self) -> u64 {
        self.mono_ns
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        if mono_ns <= self.mono_ns {
            self.wall - Duration::from_nanos(self.mono_ns - mono_ns)
        } else {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        }
    }
}

/// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-23T09:08:30.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let (y, m, d, hh, mm, ss, us) = utc(t);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{:03}Z", us / 1000)
}

/// `t` in UTC: year, month, day, hour, minute, second, microsecond.
pub fn utc(t: SystemTime) -> (i64, u32, u32, i64, i64, i64, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    (y, m, dd, rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_micros())
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Parses an RFC 3339 time stamp (what [`rfc3339`] writes, or any other offset).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_424_910_123);
        assert_eq!(rfc3339(t), "2026-11-23T09:08:30.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn anchor_maps_datapath_time_both_ways() {
        let a = Anchor::now();
        let past = a.wall(a.mono_ns() - 2_000_000_000);
        assert_eq!(a.wall(a.mono_ns()).duration_since(past).unwrap(), Duration::from_secs(2));
    }
}
