//! Draining a BPF ring buffer of fixed-size records on a dedicated thread: poll(2)
//! on its fd (1 s timeout), then hand every complete record to the owner.

use std::os::fd::AsRawFd;

use aya::maps::{MapData, RingBuf};

/// Spawns `name`, which calls `each` with the records of every wake-up (never empty).
/// `T` must be the `#[repr(C)]` record type the kernel writes.
pub fn drain<T: Copy + Send + 'static>(
    name: &str,
    mut ring: RingBuf<MapData>,
    mut each: impl FnMut(Vec<T>) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            loop {
                let mut pfd = libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
                let mut batch = Vec::new();
                while let Some(item) = ring.next() {
                    if item.len() >= std::mem::size_of::<T>() {
                        // SAFETY: the kernel wrote a `T` here; records need not be aligned.
                        batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const T) });
                    }
                }
                if !batch.is_empty() {
                    each(batch);
                }
            }
        })
        .expect("spawn ring buffer thread")
}
