//! Helpers shared by the benches: command-line numbers, this process's memory (Linux) and a
//! timed full reconcile.
#![allow(dead_code)]

/// The `p` quantile (0-1, nearest rank) of values sorted ascending; NaN when there are none.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The number after `name` on the command line, if any.
pub fn arg(name: &str) -> Option<u64> {
    arg_parsed(name)
}

/// The value after `name` on the command line, or `default` (absent or unparsable).
pub fn arg_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    arg_parsed(name).unwrap_or(default)
}

fn arg_parsed<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

/// A field of `/proc/self/status` in MiB (`VmRSS`, `VmHWM`).
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// This process's resident set size now, in MiB.
pub fn rss_mib() -> Option<f64> {
    status_mib("VmRSS:")
}

/// This process's peak RSS since the last [`reset_peak_rss`], in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// Resets the peak RSS to the current RSS (writing 5 to clear_refs); false where that is not
/// possible, and the peak then covers everything before too.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A full reconcile of `integration` as the CLI and `serve` run it (a task on the runtime's
/// workers) and its wall time; a run that ended in an error leaves nothing to measure.
pub async fn timed_reconcile(
    integration: &std::sync::Arc<rostersync::app::Integration>,
) -> (rostersync::sync::reconcile::RunReport, std::time::Duration) {
    let started = std::time::Instant::now();
    let r = integration
        .reconcile_task(rostersync::sync::reconcile::RunOptions::default(), None)
        .await
        .expect("reconcile task");
    let wall = started.elapsed();
    assert!(r.error.is_none(), "{:?}", r.error);
    (r, wall)
}
