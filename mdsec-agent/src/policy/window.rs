//! Maintenance windows: recurring, time-zoned allow rules (vendor remote
//! service on Tuesday nights). A window's occurrence is compiled into its
//! allow entries as [opens, closes) in datapath time, so the kernel opens and
//! closes it on the instant; the reloader writes the next occurrence once one
//! has passed (`runtime`), without a reload.

use std::time::{Duration, SystemTime};

use jiff::{Timestamp, ToSpan, civil, tz::TimeZone};

/// Longest window when the agent config does not say (`change_control.max_window`).
pub const DEFAULT_MAX_WINDOW: Duration = Duration::from_secs(12 * 3600);

pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

#[derive(Debug, Clone)]
pub struct Window {
    /// Monday first.
    pub days: [bool; 7],
    /// Minutes after local midnight; `end` may be 1440 (`24:00`).
    pub start: u16,
    pub end: u16,
    pub time_zone: TimeZone,
    pub time_zone_name: String,
    pub reason: String,
    pub ticket: String,
}

/// `HH:MM`, 00:00–24:00.
pub fn parse_time(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    let t = h * 60 + m;
    (m < 60 && t <= 1440).then_some(t)
}

pub fn parse_day(s: &str) -> Option<usize> {
    let s = s.trim().to_ascii_lowercase();
    DAY_NAMES.iter().position(|d| s == *d || (s.len() > 3 && d.starts_with(&s[..3]) && is_full_day(&s)))
}

fn is_full_day(s: &str) -> bool {
    ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"].contains(&s)
}

pub fn time_text(t: u16) -> String {
    format!("{:02}:{:02}", t / 60, t % 60)
}

impl Window {
    pub fn length(&self) -> Duration {
        Duration::from_secs(u64::from(self.end.saturating_sub(self.start)) * 60)
    }

    /// `tue,thu 22:00-23:30 Europe/Berlin`.
    pub fn text(&self) -> String {
        let days: Vec<&str> = (0..7).filter(|&d| self.days[d]).map(|d| DAY_NAMES[d]).collect();
        format!(
            "{} {}-{} {}",
            days.join(","),
            time_text(self.start),
            time_text(self.end),
            self.time_zone_name
        )
    }

    /// The local instant `minutes` after midnight of `date` (a time in a DST
    /// gap moves forward, one in an overlap takes the earlier instant).
    fn at(&self, date: civil::Date, minutes: u16) -> Option<SystemTime> {
        let (date, minutes) = if minutes == 1440 { (date.tomorrow().ok()?, 0) } else { (date, minutes) };
        let dt = date.at((minutes / 60) as i8, (minutes % 60) as i8, 0, 0);
        Some(SystemTime::from(dt.to_zoned(self.time_zone.clone()).ok()?.timestamp()))
    }

    /// The occurrence open at `now`, or else the next: (opens, closes).
    pub fn occurrence(&self, now: SystemTime) -> Option<(SystemTime, SystemTime)> {
        let today = Timestamp::try_from(now).ok()?.to_zoned(self.time_zone.clone()).date();
        // Yesterday's occurrence may still be open (a local day can be 25 h).
        (-1i64..=8)
            .filter_map(|d| today.checked_add(d.days()).ok())
            .filter(|d| self.days[d.weekday().to_monday_zero_offset() as usize])
            .filter_map(|d| Some((self.at(d, self.start)?, self.at(d, self.end)?)))
            .find(|&(_, closes)| closes > now)
    }

    pub fn is_open(&self, now: SystemTime) -> bool {
        self.occurrence(now).is_some_and(|(opens, _)| opens <= now)
    }

    /// Do two windows share an instant? Compared on their occurrences over
    /// the coming year, so windows in different time zones compare too.
    pub fn overlaps(&self, other: &Window) -> bool {
        let occurrences = |w: &Window| {
            let (mut at, mut v) = (SystemTime::now(), Vec::new());
            // A year of occurrences (DST rules of two zones differ by season).
            let end = at + Duration::from_secs(366 * 86_400);
            while let Some(o) = w.occurrence(at).filter(|o| o.0 < end) {
                v.push(o);
                at = o.1;
            }
            v
        };
        let (a, b) = (occurrences(self), occurrences(other));
        a.iter().any(|x| b.iter().any(|y| x.0 < y.1 && y.0 < x.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(days: &[usize], start: &str, end: &str, tz: &str) -> Window {
        let mut d = [false; 7];
        days.iter().for_each(|&i| d[i] = true);
        Window {
            days: d,
            start: parse_time(start).unwrap(),
            end: parse_time(end).unwrap(),
            time_zone: TimeZone::get(tz).unwrap(),
            time_zone_name: tz.into(),
            reason: String::new(),
            ticket: String::new(),
        }
    }

    fn t(s: &str) -> SystemTime {
        SystemTime::from(s.parse::<Timestamp>().unwrap())
    }

    #[test]
    fn occurrences_follow_the_local_clock() {
        // Tuesdays 22:00-23:30 in Berlin: CET (UTC+1) in December.
        let win = w(&[1], "22:00", "23:30", "Europe/Berlin");
        // Wednesday 2026-12-02 12:00Z: the next is Tuesday 2026-12-08.
        let (o, c) = win.occurrence(t("2026-12-02T12:00:00Z")).unwrap();
        assert_eq!((o, c), (t("2026-12-08T21:00:00Z"), t("2026-12-08T22:30:00Z")));
        // Inside it: the open one.
        assert_eq!(win.occurrence(t("2026-12-08T21:10:00Z")).unwrap().0, t("2026-12-08T21:00:00Z"));
        // At its close: the week after.
        assert_eq!(win.occurrence(t("2026-12-08T22:30:00Z")).unwrap().0, t("2026-12-15T21:00:00Z"));
        // Summer time: CEST (UTC+2).
        assert_eq!(win.occurrence(t("2026-07-01T00:00:00Z")).unwrap().0, t("2026-07-07T20:00:00Z"));
        // 24:00 ends at the next midnight.
        let late = w(&[6], "20:00", "24:00", "UTC");
        assert_eq!(late.occurrence(t("2026-12-06T21:00:00Z")).unwrap().1, t("2026-12-07T00:00:00Z"));
    }

    #[test]
    fn times_days_and_overlaps() {
        assert_eq!(parse_time("07:05"), Some(425));
        assert_eq!(parse_time("24:00"), Some(1440));
        for bad in ["24:01", "7:05", "07:60", "0705", "ab:cd"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!((parse_day("Tue"), parse_day("tuesday"), parse_day("tues")), (Some(1), Some(1), None));
        let a = w(&[1], "22:00", "23:00", "Europe/Berlin");
        assert!(a.overlaps(&w(&[1], "22:30", "23:30", "Europe/Berlin")));
        assert!(!a.overlaps(&w(&[1], "23:00", "23:30", "Europe/Berlin")), "touching is not overlapping");
        assert!(!a.overlaps(&w(&[2], "22:00", "23:00", "Europe/Berlin")));
        // The same hours in another zone: 21:00-22:00 UTC is Berlin's 22:00-23:00.
        assert!(a.overlaps(&w(&[1], "21:30", "21:45", "UTC")));
        // Touching in winter, overlapping in summer (Lisbon is UTC+1 then).
        assert!(w(&[1], "08:00", "10:00", "UTC").overlaps(&w(&[1], "10:00", "11:00", "Europe/Lisbon")));
    }
}
