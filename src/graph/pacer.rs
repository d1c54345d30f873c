//! One integration's Graph budget: request priorities and the pacing of background reads.
//!
//! Microsoft Graph charges every directory request resource units (RU) against one token bucket
//! per app + tenant, and says how full it is: `x-ms-resource-unit` on each answer (what it
//! cost), `x-ms-throttle-limit-percentage` once more than 80 % of the limit is in use, and a
//! 429 with `Retry-After` when a request no longer fits. A request may carry
//! `x-ms-throttle-priority`; when requests are throttled, low ones go first (docs/graph-budget.md).
//!
//! Both Graph clients of an integration (the incremental worker's, normal priority, and the
//! full reconcile's, low priority: [`crate::graph::GraphClient::background`]) share one
//! [`Pacer`]:
//!
//! * **Background reads are paced** by a rate of RU per second: each low-priority request
//!   starts only once the RU of the earlier ones have been "paid" at that rate. The rate grows
//!   while Graph reports no pressure and is cut back when `x-ms-throttle-limit-percentage`
//!   appears (more than 80 % of the bucket in use) or a low request is throttled, so a full
//!   reconcile keeps the bucket below the point where Graph starts to report: the last fifth of
//!   it (at least 700 RU in the smallest tenants, 1,600 in large ones) stays for the worker.
//! * **A 429 pauses** the priority it was sent at, and everything below it, for its
//!   `Retry-After`: one shared pause instead of every waiting request trying again on its own.
//!   The retries themselves stay with the one retry primitive ([`crate::retry`]).
//! * Normal-priority requests (the worker's reads, subscriptions) are never paced, only paused
//!   by a 429 answered to a normal request (then the bucket is empty for everyone).

use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::HeaderMap;
use tokio::time::Instant;

/// `x-ms-throttle-priority` of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Priority {
    /// Background work that may wait: the full reconcile.
    Low,
    /// What a person is waiting for: the incremental worker, `sync-user`, subscriptions.
    Normal,
}

impl Priority {
    /// The header value Graph documents.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
        }
    }
}

/// Knobs of the pacer; the defaults suit every documented tenant size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PaceSettings {
    /// RU per second background reads start at: half the refill of the smallest documented
    /// bucket (3,500 RU per 10 s).
    pub initial_rate: f64,
    /// Never slower than this (so a run always progresses)…
    pub min_rate: f64,
    /// …nor faster than this (the largest documented refill, 800 RU/s, with room).
    pub max_rate: f64,
    /// While Graph reports no pressure, the rate grows by this share per second.
    pub growth: f64,
    /// Factor applied when Graph reports more than 80 % of the bucket in use (at most once
    /// per `cut_every`).
    pub cut: f64,
    pub cut_every: Duration,
    /// How long background reads rest when Graph reports pressure, per tenth of the limit
    /// above 80 % (at least one tenth).
    pub rest_per_tenth: Duration,
}

impl Default for PaceSettings {
    fn default() -> Self {
        PaceSettings {
            initial_rate: 175.0,
            min_rate: 5.0,
            max_rate: 1_000.0,
            growth: 0.10,
            cut: 0.7,
            cut_every: Duration::from_secs(1),
            rest_per_tenth: Duration::from_millis(1_000),
        }
    }
}

/// What the pacer saw and did (cumulative), for benchmarks, tests and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct PaceStats {
    /// RU Graph reported charging, by priority.
    pub ru_low: u64,
    pub ru_normal: u64,
    /// Requests answered 429 (inner `$batch` answers included), by priority.
    pub throttled_low: u64,
    pub throttled_normal: u64,
    /// Answers that reported more than 80 % of the bucket in use.
    pub pressure_reports: u64,
    /// Time background requests waited for the pace or a pause, summed over requests.
    pub low_waited: Duration,
    /// The background rate now (RU per second).
    pub low_rate: f64,
}

struct PaceState {
    /// The next background request may start then.
    next_low: Instant,
    /// Background RU per second.
    low_rate: f64,
    /// No request of any priority before this (a 429 to a normal request).
    pause_all: Option<Instant>,
    /// No background request before this (a 429 to a low one, or reported pressure).
    pause_low: Option<Instant>,
    last_cut: Option<Instant>,
    last_growth: Instant,
    stats: PaceStats,
}

/// One integration's shared Graph budget (see the module documentation).
pub(crate) struct Pacer {
    settings: PaceSettings,
    state: Mutex<PaceState>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new(PaceSettings::default())
    }
}

impl Pacer {
    pub(crate) fn new(settings: PaceSettings) -> Pacer {
        let now = Instant::now();
        Pacer {
            state: Mutex::new(PaceState {
                next_low: now,
                low_rate: settings.initial_rate,
                pause_all: None,
                pause_low: None,
                last_cut: None,
                last_growth: now,
                stats: PaceStats {
                    low_rate: settings.initial_rate,
                    ..PaceStats::default()
                },
            }),
            settings,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PaceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a request of `priority` must wait before it may be sent (zero: now).
    pub(crate) fn wait(&self, priority: Priority) -> Duration {
        let now = Instant::now();
        let s = self.lock();
        let mut until = s.pause_all;
        if priority == Priority::Low {
            until = until.max(s.pause_low).max(Some(s.next_low));
        }
        until.map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }

    /// Waits until a request of `priority` may be sent.
    pub(crate) async fn admit(&self, priority: Priority) {
        loop {
            let wait = self.wait(priority);
            if wait.is_zero() {
                return;
            }
            if priority == Priority::Low {
                self.lock().stats.low_waited += wait;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes in what an answer says about the bucket: its cost (`x-ms-resource-unit`, else
    /// `estimate`), and the share of the limit in use (`x-ms-throttle-limit-percentage`).
    pub(crate) fn answered(&self, priority: Priority, headers: &HeaderMap, estimate: u32) {
        let ru = header_f64(headers, "x-ms-resource-unit")
            .filter(|r| r.is_finite() && *r >= 0.0)
            .unwrap_or(f64::from(estimate));
        let share = header_f64(headers, "x-ms-throttle-limit-percentage")
            .filter(|p| p.is_finite() && *p > 0.0);
        self.charge(priority, ru, share);
    }

    /// [`Pacer::answered`] with the values already read.
    pub(crate) fn charge(&self, priority: Priority, ru: f64, share: Option<f64>) {
        let now = Instant::now();
        let set = self.settings;
        let mut s = self.lock();
        match priority {
            Priority::Low => {
                s.stats.ru_low += ru.round() as u64;
                // The debt of this request is paid at the background rate.
                let from = s.next_low.max(now);
                s.next_low = from + Duration::from_secs_f64(ru / s.low_rate.max(set.min_rate));
            }
            Priority::Normal => s.stats.ru_normal += ru.round() as u64,
        }
        match share {
            Some(p) if p >= 0.8 => {
                s.stats.pressure_reports += 1;
                let cut_due = s
                    .last_cut
                    .is_none_or(|t| now.duration_since(t) >= set.cut_every);
                if cut_due {
                    s.last_cut = Some(now);
                    s.low_rate = (s.low_rate * set.cut).max(set.min_rate);
                    let tenths = ((p - 0.8) * 10.0).clamp(1.0, 10.0);
                    let rest = now + set.rest_per_tenth.mul_f64(tenths);
                    s.pause_low = s.pause_low.max(Some(rest));
                }
                s.last_growth = now;
            }
            _ => {
                let secs = now.duration_since(s.last_growth).as_secs_f64();
                if secs > 0.0 {
                    s.low_rate = (s.low_rate * (1.0 + set.growth).powf(secs)).min(set.max_rate);
                    s.last_growth = now;
                }
            }
        }
        s.stats.low_rate = s.low_rate;
    }

    /// A request of `priority` was answered 429 (`retry_after`: what Graph asked for).
    pub(crate) fn throttled(&self, priority: Priority, retry_after: Option<Duration>) {
        let now = Instant::now();
        let set = self.settings;
        // Without a Retry-After: a second, the retry policy adds its own backoff.
        let until = now + retry_after.unwrap_or(Duration::from_secs(1));
        let mut s = self.lock();
        match priority {
            Priority::Low => {
                s.stats.throttled_low += 1;
                s.pause_low = s.pause_low.max(Some(until));
            }
            Priority::Normal => {
                s.stats.throttled_normal += 1;
                s.pause_all = s.pause_all.max(Some(until));
                s.pause_low = s.pause_low.max(Some(until));
            }
        }
        let cut_due = s
            .last_cut
            .is_none_or(|t| now.duration_since(t) >= set.cut_every);
        if cut_due {
            s.last_cut = Some(now);
            s.low_rate = (s.low_rate * set.cut * set.cut).max(set.min_rate);
        }
        s.last_growth = now;
        s.stats.low_rate = s.low_rate;
    }

    #[cfg(test)]
    pub(crate) fn stats(&self) -> PaceStats {
        self.lock().stats.clone()
    }
}

fn header_f64(headers: &HeaderMap, name: &str) -> Option<f64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(ru: &str, share: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-ms-resource-unit", HeaderValue::from_str(ru).unwrap());
        if let Some(p) = share {
            h.insert(
                "x-ms-throttle-limit-percentage",
                HeaderValue::from_str(p).unwrap(),
            );
        }
        h
    }

    #[test]
    fn background_requests_pay_their_ru_at_the_rate_and_normal_ones_never_wait() {
        let p = Pacer::new(PaceSettings {
            initial_rate: 100.0,
            growth: 0.0,
            ..PaceSettings::default()
        });
        assert_eq!(p.wait(Priority::Low), Duration::ZERO);
        p.answered(Priority::Low, &headers("20", None), 1);
        let w = p.wait(Priority::Low);
        assert!(
            w > Duration::from_millis(150) && w <= Duration::from_millis(200),
            "{w:?}"
        );
        p.answered(Priority::Normal, &headers("50", None), 1);
        assert_eq!(p.wait(Priority::Normal), Duration::ZERO);
        let s = p.stats();
        assert_eq!((s.ru_low, s.ru_normal), (20, 50));
    }

    #[test]
    fn pressure_cuts_the_rate_and_rests_background_reads() {
        let p = Pacer::new(PaceSettings {
            initial_rate: 100.0,
            ..PaceSettings::default()
        });
        p.answered(Priority::Normal, &headers("1", Some("0.95")), 1);
        let s = p.stats();
        assert!((s.low_rate - 70.0).abs() < 1e-9, "{}", s.low_rate);
        assert_eq!(s.pressure_reports, 1);
        assert!(p.wait(Priority::Low) >= Duration::from_millis(1_000));
        assert_eq!(p.wait(Priority::Normal), Duration::ZERO);
        // A second report within `cut_every` does not cut again.
        p.answered(Priority::Low, &headers("1", Some("0.9")), 1);
        assert!((p.stats().low_rate - 70.0).abs() < 1e-9);
    }

    #[test]
    fn a_throttled_normal_request_pauses_everyone_a_low_one_only_the_background() {
        let p = Pacer::default();
        p.throttled(Priority::Low, Some(Duration::from_secs(3)));
        assert_eq!(p.wait(Priority::Normal), Duration::ZERO);
        assert!(p.wait(Priority::Low) > Duration::from_millis(2_900));
        p.throttled(Priority::Normal, Some(Duration::from_secs(5)));
        assert!(p.wait(Priority::Normal) > Duration::from_millis(4_900));
        assert!(p.wait(Priority::Low) > Duration::from_millis(4_900));
        let s = p.stats();
        assert_eq!((s.throttled_low, s.throttled_normal), (1, 1));
    }

    /// On tokio's paused clock: a 30 s pause is waited out exactly, with no wall-clock wait.
    #[tokio::test(start_paused = true)]
    async fn admission_waits_out_a_pause_and_no_longer() {
        let p = Pacer::default();
        p.throttled(Priority::Normal, Some(Duration::from_secs(30)));
        let t0 = Instant::now();
        p.admit(Priority::Normal).await;
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_millis(30_010),
            "{waited:?}"
        );
        let t1 = Instant::now();
        p.admit(Priority::Normal).await;
        assert!(t1.elapsed() < Duration::from_millis(1), "the pause is over");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_grows_without_pressure_up_to_the_cap_and_ignores_garbage() {
        let p = Pacer::new(PaceSettings {
            initial_rate: 900.0,
            growth: 10.0,
            ..PaceSettings::default()
        });
        tokio::time::advance(Duration::from_millis(200)).await;
        p.answered(Priority::Low, &headers("not a number", Some("NaN")), 2);
        let s = p.stats();
        assert_eq!(s.low_rate, 1_000.0);
        assert_eq!(
            s.ru_low, 2,
            "the estimate stands in for an unreadable header"
        );
        assert_eq!(s.pressure_reports, 0);
    }
}
