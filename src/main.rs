//! The `rostersync` command line: parses arguments and hands over to the command modules in
//! `cli/`; `anyhow` lives only in this binary.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's malloc: a reconcile allocates and frees many small maps and
/// strings across threads, and `cargo bench --bench reconcile` measured the first reconcile's
/// rate against the LMS's about 15 % higher with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's option API (`mimalloc.h`); the `mimalloc` crate does not expose it.
extern "C" {
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::os::raw::c_int) -> std::os::raw::c_long;
}

/// `mi_option_purge_delay` in `mimalloc.h`'s `mi_option_e` (the same number in its v2 and v3;
/// v3 is the one built): how many milliseconds freed memory stays committed before it is
/// returned to the system. Its default in v3 (1,000 ms) kept tens of MiB of freed memory
/// resident during a first reconcile of 100,000 members (sled frees and allocates pages as
/// fast as it writes); 1 ms lowered that run's peak RSS by 20-50 MiB (benches/reconcile.rs,
/// C1) with no measurable change in its wall time.
const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;
const PURGE_DELAY_MS: std::os::raw::c_long = 1;

#[tokio::main]
async fn main() -> ExitCode {
    // SAFETY: sets a plain integer option; mimalloc reads options atomically.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's purge delay: its default in the v3 built is 1,000 ms,
    /// and no neighbouring option defaults to 1,000.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads a plain integer option.
        let default = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000);
        // SAFETY: as in `main`.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
        assert_eq!(
            unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) },
            PURGE_DELAY_MS
        );
    }
}
