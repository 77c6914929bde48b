//! The Kafka messages' write-ahead spool in `state_dir`: every message is
//! appended here first and leaves only once the broker acknowledged it, so a
//! broker outage, an agent restart or a `kill -9` loses nothing (at least
//! once: a message acknowledged in the last moments before a kill is sent
//! again, under the same id).
//!
//! Layout: segment files `<first seq, 20 digits>.seg` of length-prefixed,
//! CRC-checked records; `delivered` holds the first sequence number not yet
//! acknowledged; `id` the spool's random incarnation (message ids are
//! `<incarnation>-<seq>`, unique even when a spool is deleted and begun anew).
//! The total size is bounded: when full, the oldest segment goes, and its
//! undelivered records are counted as dropped.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Record header: body length, CRC-32 of the body.
const HEADER: usize = 8;
/// Body prefix: append time (ms), topic, flags, key length.
const PREFIX: usize = 8 + 1 + 1 + 2;
const TOMBSTONE: u8 = 1;
/// A larger length is damage, not a record (messages are far smaller).
const MAX_RECORD: usize = 16 << 20;
const DELIVERED: &str = "delivered";
const INCARNATION: &str = "id";

/// One spooled message.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    /// Index into the sink's topic list.
    pub topic: u8,
    pub key: Vec<u8>,
    /// None: a tombstone (a compacted topic's delete).
    pub value: Option<Vec<u8>>,
    /// When it was spooled (ms since the epoch): the delivery latency's start.
    pub at_ms: u64,
}

#[derive(Debug)]
struct Segment {
    first: u64,
    records: u64,
    bytes: u64,
    path: PathBuf,
}

impl Segment {
    fn end(&self) -> u64 {
        self.first + self.records
    }
}

/// The reader's place: the next record of a segment file.
struct Cursor {
    first: u64,
    next: u64,
    file: BufReader<File>,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    writer: Option<BufWriter<File>>,
    next_seq: u64,
    /// The first sequence number not acknowledged.
    delivered: u64,
    saved_delivered: u64,
    saved_at: Instant,
    read: Option<Cursor>,
    /// The next sequence number the reader returns.
    read_seq: u64,
    incarnation: String,
    /// Undelivered records removed because the spool was full.
    pub dropped: u64,
}

/// What opening found that an operator should hear about.
pub type Warnings = Vec<String>;

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. Damage never fails the open: a
    /// torn last record (a kill in mid-write) is cut off; a segment with a
    /// bad record is moved aside as `*.corrupt`; each is a warning.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<(Spool, Warnings)> {
        fs::create_dir_all(dir)?;
        let mut warnings = Vec::new();
        let incarnation = incarnation(dir, &mut warnings)?;
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let first = name.strip_suffix(".seg")?.parse().ok()?;
                Some((first, e.path()))
            })
            .collect();
        names.sort();
        let mut segments = VecDeque::new();
        for (first, path) in names {
            match scan(&path)? {
                Scan::Clean { records, bytes } => segments.push_back(Segment { first, records, bytes, path }),
                Scan::Torn { records, bytes } => {
                    warnings.push(format!(
                        "{}: a torn record at its end (an interrupted write) was cut off",
                        path.display()
                    ));
                    OpenOptions::new().write(true).open(&path)?.set_len(bytes)?;
                    segments.push_back(Segment { first, records, bytes, path });
                }
                Scan::Corrupt { at } => {
                    let aside = path.with_extension("seg.corrupt");
                    fs::rename(&path, &aside)?;
                    warnings.push(format!(
                        "{}: damaged at byte {at}; moved aside to {} and not sent",
                        path.display(),
                        aside.display()
                    ));
                }
            }
        }
        // Segments that overlap an earlier one (a renamed or copied file) cannot be ordered.
        let mut kept: VecDeque<Segment> = VecDeque::new();
        for s in segments {
            if kept.back().is_some_and(|p| s.first < p.end()) {
                let aside = s.path.with_extension("seg.corrupt");
                fs::rename(&s.path, &aside)?;
                warnings.push(format!("{}: overlaps the segment before it; moved aside", s.path.display()));
                continue;
            }
            kept.push_back(s);
        }
        let next_seq = kept.back().map_or(0, Segment::end);
        let first = kept.front().map_or(next_seq, |s| s.first);
        let delivered = match fs::read_to_string(dir.join(DELIVERED)) {
            Ok(t) => match t.trim().parse::<u64>() {
                Ok(n) => n.clamp(first, next_seq),
                Err(_) => {
                    warnings.push(format!(
                        "{}: not a sequence number; everything spooled is sent again",
                        dir.join(DELIVERED).display()
                    ));
                    first
                }
            },
            Err(_) => first,
        };
        let segment_bytes = (max_bytes / 8).clamp(4 << 10, 16 << 20);
        let mut spool = Spool {
            dir: dir.into(),
            max_bytes,
            segment_bytes,
            segments: kept,
            writer: None,
            next_seq,
            delivered,
            saved_delivered: delivered,
            saved_at: Instant::now(),
            read: None,
            read_seq: delivered,
            incarnation,
            dropped: 0,
        };
        spool.collect()?;
        Ok((spool, warnings))
    }

    /// The id the next appended message gets.
    pub fn next_id(&self) -> String {
        self.id_of(self.next_seq)
    }

    /// Appends one message; returns its sequence number. Written through to
    /// the kernel at [`Spool::flush`] (a process kill loses nothing after that).
    pub fn append(&mut self, topic: u8, key: &[u8], value: Option<&[u8]>) -> io::Result<u64> {
        let key = &key[..key.len().min(u16::MAX as usize)];
        let value_len = value.map_or(0, <[u8]>::len);
        let body_len = PREFIX + key.len() + value_len;
        if body_len > MAX_RECORD {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "message larger than 16 MiB"));
        }
        let mut buf = Vec::with_capacity(HEADER + body_len);
        buf.extend_from_slice(&(body_len as u32).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&now_ms().to_le_bytes());
        buf.push(topic);
        buf.push(if value.is_none() { TOMBSTONE } else { 0 });
        buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
        buf.extend_from_slice(key);
        if let Some(v) = value {
            buf.extend_from_slice(v);
        }
        let crc = crc32fast::hash(&buf[HEADER..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());

        if self.segments.back().is_none_or(|s| s.bytes >= self.segment_bytes) || self.writer.is_none() {
            self.roll()?;
        }
        self.writer.as_mut().expect("rolled").write_all(&buf)?;
        let seg = self.segments.back_mut().expect("rolled");
        seg.records += 1;
        seg.bytes += buf.len() as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.bytes() > self.max_bytes {
            self.drop_oldest()?;
        }
        Ok(seq)
    }

    /// Hands what was appended to the kernel.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.writer {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }

    /// Continues in the last segment if it has room, else starts a new one.
    fn roll(&mut self) -> io::Result<()> {
        self.flush()?;
        if let Some(last) = self.segments.back()
            && last.bytes < self.segment_bytes
        {
            let f = OpenOptions::new().append(true).open(&last.path)?;
            self.writer = Some(BufWriter::with_capacity(64 << 10, f));
            return Ok(());
        }
        let path = self.dir.join(segment_name(self.next_seq));
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        self.segments.push_back(Segment { first: self.next_seq, records: 0, bytes: 0, path });
        self.writer = Some(BufWriter::with_capacity(64 << 10, f));
        Ok(())
    }

    /// The spool is full: the oldest segment goes, delivered or not.
    fn drop_oldest(&mut self) -> io::Result<()> {
        while self.bytes() > self.max_bytes && self.segments.len() > 1 {
            let s = self.segments.pop_front().expect("two or more");
            self.dropped += s.end().saturating_sub(self.delivered.max(s.first));
            fs::remove_file(&s.path)?;
            let next = self.segments.front().map_or(self.next_seq, |n| n.first);
            self.delivered = self.delivered.max(next);
            if self.read_seq < next {
                self.read_seq = next;
                self.read = None;
            }
        }
        Ok(())
    }

    /// The next record not yet handed out, if any.
    pub fn read_next(&mut self) -> io::Result<Option<Record>> {
        loop {
            if self.read_seq >= self.next_seq {
                return Ok(None);
            }
            if self.read.as_ref().is_none_or(|c| c.next != self.read_seq) {
                self.read = self.seek(self.read_seq)?;
            }
            let Some(c) = self.read.as_mut() else { return Ok(None) };
            let end = self.segments.iter().find(|s| s.first == c.first).map_or(0, Segment::end);
            if c.next >= end {
                // Past this segment: the next one (a gap of moved-aside records is skipped).
                self.read_seq =
                    self.segments.iter().find(|s| s.first > c.first).map_or(self.next_seq, |s| s.first);
                self.read = None;
                continue;
            }
            if self.segments.back().is_some_and(|s| s.first == c.first) {
                // The active segment: what the writer buffers must be in the file.
                if let Some(w) = &mut self.writer {
                    w.flush()?;
                }
            }
            let c = self.read.as_mut().expect("just set");
            let rec = read_record(&mut c.file)?;
            let Some((at_ms, topic, key, value)) = rec else {
                // Shorter than the index says (it was cut): on to the next segment.
                self.read_seq = c.next + 1;
                self.read = None;
                continue;
            };
            let seq = c.next;
            c.next += 1;
            self.read_seq = c.next;
            return Ok(Some(Record { seq, topic, key, value, at_ms }));
        }
    }

    /// Opens the segment holding `seq` (or the first one after it) at that record.
    fn seek(&mut self, seq: u64) -> io::Result<Option<Cursor>> {
        let Some(s) = self.segments.iter().find(|s| s.end() > seq) else { return Ok(None) };
        let mut file = BufReader::with_capacity(64 << 10, File::open(&s.path)?);
        let start = seq.max(s.first);
        for _ in s.first..start {
            let mut h = [0u8; HEADER];
            file.read_exact(&mut h)?;
            let len = u32::from_le_bytes(h[..4].try_into().unwrap());
            file.seek(SeekFrom::Current(len as i64))?;
        }
        self.read_seq = start;
        Ok(Some(Cursor { first: s.first, next: start, file }))
    }

    /// The reader starts again at the first unacknowledged record (after a
    /// failed delivery: what followed it is sent again, in order).
    pub fn rewind(&mut self) {
        self.read_seq = self.delivered;
        self.read = None;
    }

    /// Everything below `upto` is acknowledged: removes whole delivered
    /// segments and records the mark (at most every 200 ms; [`Spool::sync`]).
    pub fn delivered(&mut self, upto: u64) -> io::Result<()> {
        if upto > self.delivered {
            self.delivered = upto.min(self.next_seq);
            self.collect()?;
        }
        if self.saved_delivered != self.delivered && self.saved_at.elapsed() >= Duration::from_millis(200) {
            self.sync()?;
        }
        Ok(())
    }

    /// The sequence number the reader returns next.
    pub fn read_position(&self) -> u64 {
        self.read_seq
    }

    /// The message id of a record (the one its value carries).
    pub fn id_of(&self, seq: u64) -> String {
        format!("{}-{seq}", self.incarnation)
    }

    /// Writes the delivered mark now (and the appended records to the kernel).
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.saved_at = Instant::now();
        if self.saved_delivered == self.delivered {
            return Ok(());
        }
        let path = self.dir.join(DELIVERED);
        let tmp = self.dir.join("delivered.tmp");
        fs::write(&tmp, format!("{}\n", self.delivered))?;
        fs::rename(&tmp, &path)?;
        self.saved_delivered = self.delivered;
        Ok(())
    }

    /// Removes segments wholly delivered (the one being written stays).
    fn collect(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.end() <= self.delivered) {
            let s = self.segments.pop_front().expect("checked");
            fs::remove_file(&s.path)?;
            if self.read.as_ref().is_some_and(|c| c.first == s.first) {
                self.read = None;
            }
        }
        Ok(())
    }

    /// Records spooled and not acknowledged.
    pub fn pending(&self) -> u64 {
        self.segments.iter().map(|s| s.end().saturating_sub(self.delivered.max(s.first))).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    pub fn first_unacknowledged(&self) -> u64 {
        self.delivered
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Reads one record; None at a clean or torn end.
#[allow(clippy::type_complexity)]
fn read_record(f: &mut impl Read) -> io::Result<Option<(u64, u8, Vec<u8>, Option<Vec<u8>>)>> {
    let mut h = [0u8; HEADER];
    if read_full(f, &mut h)? < HEADER {
        return Ok(None);
    }
    let len = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
    if !(PREFIX..=MAX_RECORD).contains(&len) {
        return Ok(None);
    }
    let mut body = vec![0u8; len];
    if read_full(f, &mut body)? < len
        || crc32fast::hash(&body) != u32::from_le_bytes(h[4..].try_into().unwrap())
    {
        return Ok(None);
    }
    Ok(Some(decode(body)))
}

fn decode(body: Vec<u8>) -> (u64, u8, Vec<u8>, Option<Vec<u8>>) {
    let at_ms = u64::from_le_bytes(body[..8].try_into().unwrap());
    let topic = body[8];
    let tombstone = body[9] & TOMBSTONE != 0;
    let klen = u16::from_le_bytes(body[10..12].try_into().unwrap()) as usize;
    let key = body[PREFIX..PREFIX + klen].to_vec();
    let value = (!tombstone).then(|| body[PREFIX + klen..].to_vec());
    (at_ms, topic, key, value)
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

enum Scan {
    Clean {
        records: u64,
        bytes: u64,
    },
    /// The last record is incomplete: keep `bytes`.
    Torn {
        records: u64,
        bytes: u64,
    },
    Corrupt {
        at: u64,
    },
}

/// Checks every record of a segment file.
fn scan(path: &Path) -> io::Result<Scan> {
    let data = fs::read(path)?;
    let (mut at, mut records) = (0usize, 0u64);
    while at < data.len() {
        let rest = &data[at..];
        if rest.len() < HEADER {
            return Ok(Scan::Torn { records, bytes: at as u64 });
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        if !(PREFIX..=MAX_RECORD).contains(&len) {
            return Ok(Scan::Corrupt { at: at as u64 });
        }
        if rest.len() < HEADER + len {
            return Ok(Scan::Torn { records, bytes: at as u64 });
        }
        let body = &rest[HEADER..HEADER + len];
        let klen = u16::from_le_bytes(body[10..12].try_into().unwrap()) as usize;
        if crc32fast::hash(body) != u32::from_le_bytes(rest[4..8].try_into().unwrap()) || PREFIX + klen > len
        {
            return Ok(Scan::Corrupt { at: at as u64 });
        }
        at += HEADER + len;
        records += 1;
    }
    Ok(Scan::Clean { records, bytes: at as u64 })
}

/// The spool's random id, made once (from the kernel's random source).
fn incarnation(dir: &Path, warnings: &mut Warnings) -> io::Result<String> {
    let path = dir.join(INCARNATION);
    if let Ok(t) = fs::read_to_string(&path) {
        let t = t.trim();
        if t.len() == 16 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(t.to_string());
        }
        warnings.push(format!("{}: not a spool id; a new one is made", path.display()));
    }
    let mut b = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    let id = format!("{:016x}", u64::from_le_bytes(b));
    let tmp = dir.join("id.tmp");
    fs::write(&tmp, format!("{id}\n"))?;
    fs::rename(&tmp, &path)?;
    Ok(id)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mdsec-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn drain(s: &mut Spool) -> Vec<Record> {
        std::iter::from_fn(|| s.read_next().unwrap()).collect()
    }

    #[test]
    fn records_come_back_in_order_across_a_reopen_and_only_undelivered_ones() {
        let d = dir("order");
        let (mut s, w) = Spool::open(&d, 1 << 20).unwrap();
        assert!(w.is_empty());
        let id = s.next_id();
        for i in 0..100u32 {
            let v = format!("value {i}");
            let value = (i % 10 != 9).then_some(v.as_bytes());
            assert_eq!(s.append((i % 3) as u8, format!("k{i}").as_bytes(), value).unwrap(), i as u64);
        }
        let got = drain(&mut s);
        assert_eq!(got.len(), 100);
        assert_eq!(got[9].value, None, "a tombstone stays one");
        assert_eq!(got[5].value.as_deref(), Some(&b"value 5"[..]));
        assert_eq!((got[5].topic, &got[5].key[..]), (2, &b"k5"[..]));
        s.delivered(40).unwrap();
        s.sync().unwrap();
        drop(s);
        let (mut s, w) = Spool::open(&d, 1 << 20).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.next_id().split('-').next(), id.split('-').next(), "the incarnation stays");
        assert_eq!(s.pending(), 60);
        let got = drain(&mut s);
        assert_eq!(got.first().map(|r| r.seq), Some(40));
        assert_eq!(got.len(), 60);
        assert_eq!(s.append(0, b"k", Some(b"v")).unwrap(), 100, "numbering continues");
        // A failed delivery: the reader starts again at the first unacknowledged record.
        s.rewind();
        assert_eq!(s.read_next().unwrap().map(|r| r.seq), Some(40));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts_them() {
        let d = dir("full");
        let (mut s, _) = Spool::open(&d, 64 << 10).unwrap();
        let value = vec![b'x'; 1000];
        for _ in 0..200 {
            s.append(0, b"k", Some(&value)).unwrap();
        }
        assert!(s.bytes() <= 64 << 10, "{}", s.bytes());
        let kept = s.pending();
        assert_eq!(kept + s.dropped, 200);
        assert!(s.dropped > 100, "{}", s.dropped);
        let got = drain(&mut s);
        assert_eq!(got.len() as u64, kept);
        assert_eq!(got.last().unwrap().seq, 199, "the newest are kept");
        assert_eq!(got[0].seq, 200 - kept);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn delivered_segments_are_removed() {
        let d = dir("collect");
        let (mut s, _) = Spool::open(&d, 64 << 10).unwrap();
        let value = vec![b'x'; 500];
        for _ in 0..40 {
            s.append(0, b"k", Some(&value)).unwrap();
        }
        let files = || {
            fs::read_dir(&d)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
                .count()
        };
        assert!(files() > 2);
        drain(&mut s);
        s.delivered(40).unwrap();
        assert_eq!(files(), 1, "only the segment being written stays");
        assert_eq!(s.pending(), 0);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_damaged_segment_moved_aside() {
        let d = dir("damage");
        let (mut s, _) = Spool::open(&d, 64 << 10).unwrap();
        let value = vec![b'y'; 1000];
        for _ in 0..20 {
            s.append(0, b"k", Some(&value)).unwrap();
        }
        s.flush().unwrap();
        let segs: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .collect();
            v.sort();
            v
        };
        assert!(segs.len() >= 3);
        drop(s);
        // The last segment loses half a record (a kill in mid-write) …
        let last = segs.last().unwrap();
        let len = fs::metadata(last).unwrap().len();
        OpenOptions::new().write(true).open(last).unwrap().set_len(len - 300).unwrap();
        // … and the first has a flipped byte.
        let mut b = fs::read(&segs[0]).unwrap();
        b[HEADER + 20] ^= 0xff;
        fs::write(&segs[0], b).unwrap();
        let (mut s, w) = Spool::open(&d, 64 << 10).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|m| m.contains("torn")), "{w:?}");
        assert!(w.iter().any(|m| m.contains("moved aside")), "{w:?}");
        assert!(segs[0].with_extension("seg.corrupt").exists());
        let got = drain(&mut s);
        assert!(got.iter().all(|r| r.value.as_deref() == Some(&value[..])));
        assert_eq!(got.len() as u64, s.pending());
        // The first segment's records are gone, the torn 20th too; the rest in order.
        assert!(got[0].seq > 0);
        assert_eq!(got.last().unwrap().seq, 18);
        assert_eq!(got.len(), 19 - got[0].seq as usize);
        fs::remove_dir_all(&d).unwrap();
    }
}
