//! How the process's allocator (mimalloc, installed by the `chaperone` binary) is tuned.
//!
//! mimalloc hands memory it no longer uses back to the OS (`madvise(MADV_DONTNEED)`) one
//! second after it was freed. Under load the recorder frees a batch's Arrow and Parquet
//! buffers every few hundred milliseconds and the data-path threads free rows other
//! threads allocated, so the same memory was handed back and faulted in again: a fifth of
//! a page fault per request, each one costing the kernel (and, virtualised, the
//! hypervisor) several microseconds. Keeping freed memory for [`PURGE_DELAY`] cut the
//! faults to a fifth and the CPU per request by 1.1-1.4 µs (docs/benchmarks.md, session
//! 12); memory still goes back to the OS once the load drops.

use std::time::Duration;

/// How long mimalloc keeps freed memory before returning it to the OS.
pub const PURGE_DELAY: Duration = Duration::from_secs(10);

/// `mi_option_purge_delay` in `mimalloc.h` (the same value in mimalloc 2 and 3);
/// libmimalloc-sys has no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies the settings above; call first thing in `main`, before other threads start.
#[expect(
    unsafe_code,
    reason = "mimalloc's options are set through its C API; libmimalloc-sys has no safe wrapper"
)]
pub fn tune() {
    let millis = libc::c_long::try_from(PURGE_DELAY.as_millis()).unwrap_or(libc::c_long::MAX);
    // SAFETY: `mi_option_set` stores a value in mimalloc's option table; the option is a
    // valid `mi_option_t`. The table is not synchronised, so this runs before the process
    // starts its other threads.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, millis) }
}

/// The purge delay mimalloc uses now, in milliseconds.
#[expect(
    unsafe_code,
    reason = "mimalloc's options are read through its C API; libmimalloc-sys has no safe wrapper"
)]
pub fn purge_delay_ms() -> libc::c_long {
    // SAFETY: reading an option is a plain load from mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's purge delay: it holds mimalloc 3's default of one
    /// second before `tune` and the configured delay after. (The test process does not
    /// use mimalloc as its allocator; its option table is there all the same.)
    #[test]
    fn tune_sets_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay_ms(), 1000, "option 15 is not the purge delay");
        }
        tune();
        assert_eq!(purge_delay_ms(), 10_000);
    }
}
