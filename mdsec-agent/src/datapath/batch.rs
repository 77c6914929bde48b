//! Whole-map reads with `BPF_MAP_LOOKUP_BATCH`: one syscall per chunk of entries,
//! where aya's iterator makes two per entry (get-next-key, then lookup). The
//! poller reads `DEVICES` this way (the flow tables are read through their
//! mapping, `flowtable.rs`).

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd, AsRawFd},
};

use aya::{Pod, maps::MapData};

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd` (Linux 5.6).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call.
const CHUNK: usize = 16_384;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of a hash map. The map may change meanwhile (the datapath
/// keeps writing); hash maps are walked bucket by bucket, so every entry present
/// throughout the read is returned once.
pub fn read_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // Opaque cursors: a 4-byte bucket index for hash maps, a key for others.
    let (mut cursor_in, mut cursor_out) = ([0u8; 64], [0u8; 64]);
    let mut first = true;
    loop {
        let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(chunk);
        let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(chunk);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor_in.as_ptr() as u64 },
            out_batch: cursor_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd,
            ..Default::default()
        };
        // SAFETY: `attr` points at buffers of `chunk` keys and values and two
        // cursors larger than any cursor the kernel writes; the size passed is
        // the struct's.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // A bucket holds more entries than the buffer: ask for more at once.
            Some(libc::ENOSPC) if chunk < 1 << 22 => {
                chunk *= 4;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(err.unwrap()),
        }
        // The kernel never reports more than it was asked for; stay in bounds anyway.
        let n = (attr.count as usize).min(chunk);
        // SAFETY: the kernel filled the first `n` keys and values (on success
        // and on ENOENT, the end of the map).
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        out.extend(keys.into_iter().zip(values).map(|(k, v)| {
            // SAFETY: initialised above; K and V are Pod.
            unsafe { (k.assume_init(), v.assume_init()) }
        }));
        if err.is_some() {
            return Ok(out);
        }
        cursor_in = cursor_out;
        first = false;
    }
}
