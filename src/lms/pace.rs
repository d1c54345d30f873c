//! Paces one integration's requests to its LMS at the LMS's own limit: adaptive concurrency
//! and rate (AIMD) with one shared pause when the LMS throttles.
//!
//! Every request to the LMS takes a [`Permit`] from the target's [`Pacer`] and reports how it
//! went. The pacer keeps three things:
//!
//! - a **concurrency window** between 1 and the configured ceiling (`target.concurrency`). It
//!   starts small and grows by one per answered request while it is full (doubling every
//!   round trip, "slow start"), then by one per window of answers (additive increase). It is
//!   cut (multiplicative decrease) when the LMS sheds load (503) or when answers take, on a
//!   moving average, more than twice the fastest latency seen (the LMS is queueing). Only
//!   requests on the wire hold a place in it, not those waiting for the rate;
//! - a **request rate**, unknown until the LMS first throttles (429): it is then set to half
//!   the rate that was being sent (slow start overshoots by up to twice). At each later
//!   throttle the LMS's own rate is measured: from the request that met the limit to the next
//!   one that does, the LMS admitted what it refilled in that time, so the rate is the
//!   requests admitted since the pause ended divided by that time (kept between a quarter and
//!   97 % of what was being sent). While requests wait for it, it is raised: by 2 % a second
//!   while it is slow start's guess, then by 0.4 % per round trip (at most 2 % a second),
//!   since what the next limit costs is the requests sent within one round trip above it:
//!   about 0.4 % of them are refused, at 100 ms as at 500 ms. Requests are spaced by it, so a
//!   token bucket on the LMS side is drained slowly instead of being hit by a burst;
//! - **one shared pause**: a 429, or a 503 with `Retry-After`, stops every request of the
//!   integration (not only the one that met it) until `Retry-After` has passed. Refusals that
//!   belong to the same episode (requests sent before the cut, or within a second of it)
//!   lengthen the pause but do not cut again.
//!
//! How long one request may go on waiting out throttles is its caller's business
//! ([`crate::retry::Backoff`] with a deadline); the pacer only says when to send.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The window the pacer starts with (never above the ceiling).
const INITIAL_WINDOW: f64 = 2.0;
/// A throttle cuts the window and the rate to this share.
const CUT: f64 = 0.85;
/// The first throttle (ending slow start) sets the rate to this share of what was sent.
const SLOW_START_CUT: f64 = 0.5;
/// A later cut measures the LMS's rate (see `finish`), kept within these shares of the rate
/// that was being sent.
const MIN_CUT: f64 = 0.25;
const MAX_CUT: f64 = 0.97;
/// Starts counted since a pause ended, at most.
const MAX_SINCE_RESUME: usize = 100_000;
/// A 503 with `Retry-After` (the LMS shedding load) halves the window.
const SHED_CUT: f64 = 0.5;
/// A latency cut (the LMS queueing) is gentler.
const LATENCY_CUT: f64 = 0.9;
/// The rate rises by this share per second while requests wait for it, at most.
const RATE_RAISE_PER_SEC: f64 = 0.02;
/// Once the LMS's rate has been measured (see `finish`), it rises by at most this share per
/// round trip: the requests that meet the next limit are those sent within one round trip
/// above it, so this bounds the share of refused requests (about this much) whatever the
/// latency, where a rise per second would cost five times as many at 500 ms as at 100 ms.
const RATE_RAISE_PER_ROUND_TRIP: f64 = 0.004;
/// An answer slower than this multiple of the fastest one seen (plus [`LATENCY_SLACK`])
/// means the LMS is queueing requests.
const LATENCY_FACTOR: f64 = 2.0;
const LATENCY_SLACK: Duration = Duration::from_millis(20);
/// Weight of a new answer in the moving average of answer times.
const LATENCY_WEIGHT: f64 = 0.1;
/// At most one cut within this span.
const EPISODE: Duration = Duration::from_secs(1);
/// Requests started within this span make the "rate being sent" a throttle cuts from.
const RATE_SPAN: Duration = Duration::from_secs(1);

/// The pacer of one LMS (one integration's target).
#[derive(Debug)]
pub struct Pacer {
    ceiling: usize,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Debug)]
struct State {
    window: f64,
    slow_start: bool,
    /// Requests a second; `None` until the LMS first throttles.
    rate: Option<f64>,
    /// The rate was measured from what the LMS admitted (a later throttle), not guessed from
    /// what slow start was sending.
    measured: bool,
    /// The earliest start of the next request under `rate`.
    next_slot: Instant,
    paused_until: Option<Instant>,
    in_flight: usize,
    /// When the window or rate was last cut: refusals of requests sent before it belong to
    /// the episode that caused the cut.
    last_cut: Option<Instant>,
    /// The same for the rate (a window cut does not make a 429 part of its episode).
    last_rate_cut: Option<Instant>,
    fastest: Option<Duration>,
    /// Moving average of answer times, in seconds.
    latency: Option<f64>,
    last_throttle: Option<Instant>,
    /// When the pause of the last rate cut ends, and when the request that caused it was sent
    /// (the LMS's bucket refills from then on).
    resumed: Option<Instant>,
    cut_sent: Option<Instant>,
    /// Starts since `resumed` (at most [`MAX_SINCE_RESUME`]).
    since_resume: VecDeque<Instant>,
    /// Starts within the last [`RATE_SPAN`].
    recent: VecDeque<Instant>,
    stats: PaceStats,
}

/// What the pacer has seen and where it stands (for benches, `/status`-like reports and
/// tests).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PaceStats {
    /// Requests answered (any status) or failed in transport.
    pub requests: u64,
    /// Of those, answered 429 or 503-with-`Retry-After`.
    pub throttled: u64,
    /// Shared pauses begun.
    pub pauses: u64,
    /// Cuts of the window or rate.
    pub cuts: u64,
    /// The concurrency window now.
    pub window: f64,
    /// The request rate now (requests a second), once the LMS has throttled.
    pub rate: Option<f64>,
}

/// How a paced request went.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Outcome {
    /// Answered (whatever the status, bar a throttle).
    Answered,
    /// Answered a request whose time grows with what it carries (a SCIM bulk request of up to
    /// `maxOperations` operations): as [`Outcome::Answered`], but its time is not compared
    /// with other answers' (a large request is slow without the LMS queueing).
    AnsweredSized,
    /// Answered 429, or 503 with `Retry-After` (`shed`): every request pauses for `pause`.
    /// A 429 sets or cuts the rate; a 503 (the LMS shedding load) halves the window.
    Throttled { pause: Duration, shed: bool },
    /// Answered 503 without `Retry-After`: the LMS sheds load; the window is cut, nobody
    /// pauses (the request's own backoff applies).
    Shed,
    /// No answer (a transport error): says nothing about the LMS's limit.
    NoAnswer,
}

/// One request's place in the pacer; report its outcome with [`Permit::done`] (dropping it
/// counts as [`Outcome::NoAnswer`]).
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    pacer: &'a Pacer,
    sent: Instant,
    /// The window was at least half in use when this request started (so growth is earned).
    window_full: bool,
    /// The request waited for the rate (so the rate is what holds it back).
    rate_bound: bool,
    /// It took a place in the window (given back when it ends).
    holds_place: bool,
    /// Past every wait (the request is being sent).
    started: bool,
    finished: bool,
}

impl Pacer {
    /// A pacer that never has more than `ceiling` requests in flight.
    pub(crate) fn new(ceiling: usize) -> Pacer {
        let ceiling = ceiling.max(1);
        Pacer {
            ceiling,
            state: Mutex::new(State {
                window: INITIAL_WINDOW.min(ceiling as f64),
                slow_start: true,
                rate: None,
                measured: false,
                next_slot: Instant::now(),
                paused_until: None,
                in_flight: 0,
                last_cut: None,
                last_rate_cut: None,
                fastest: None,
                latency: None,
                last_throttle: None,
                resumed: None,
                cut_sent: None,
                since_resume: VecDeque::new(),
                recent: VecDeque::new(),
                stats: PaceStats::default(),
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters and the current window and rate.
    pub fn stats(&self) -> PaceStats {
        let st = self.lock();
        PaceStats {
            window: st.window,
            rate: st.rate,
            ..st.stats
        }
    }

    /// Whether the LMS asked for a pause that has not passed yet.
    #[cfg(test)]
    pub(crate) fn paused(&self) -> bool {
        self.lock().paused_until.is_some_and(|p| p > Instant::now())
    }

    /// Whether the LMS throttled within the last `span`.
    pub(crate) fn throttled_within(&self, span: Duration) -> bool {
        self.lock()
            .last_throttle
            .is_some_and(|t| t.elapsed() <= span)
    }

    /// Waits until a request may be sent: within the window, at the rate, after any pause.
    pub(crate) async fn acquire(&self) -> Permit<'_> {
        let mut permit = Permit {
            pacer: self,
            sent: Instant::now(),
            window_full: false,
            rate_bound: false,
            holds_place: false,
            started: false,
            finished: false,
        };
        // 1. Its time: the rate's slot, after the shared pause (a pause that began while
        // waiting moves the slot behind it). Waiting for the rate holds no place in the window.
        let mut slot = self.lock().reserve();
        loop {
            if slot > Instant::now() {
                permit.rate_bound = true;
                tokio::time::sleep_until(slot).await;
            }
            let mut st = self.lock();
            match st.paused_until {
                Some(p) if p > Instant::now() => {
                    st.next_slot = st.next_slot.max(p);
                    slot = st.reserve();
                }
                _ => break,
            }
        }
        // 2. A place in the window (requests on the wire).
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if (st.in_flight as f64) < st.window.floor().max(1.0) {
                    st.in_flight += 1;
                    permit.holds_place = true;
                    // Window-limited (as TCP counts it): at least half of it in use, so an
                    // answer may grow it.
                    permit.window_full = 2.0 * st.in_flight as f64 >= st.window.floor();
                    break;
                }
            }
            notified.await;
        }
        // 3. A pause that began meanwhile is waited out too (everyone waits anyway).
        loop {
            let pause = {
                let mut st = self.lock();
                let now = Instant::now();
                match st.paused_until {
                    Some(p) if p > now => Some(p),
                    _ => {
                        st.recent.push_back(now);
                        if st.resumed.is_some_and(|r| now >= r)
                            && st.since_resume.len() < MAX_SINCE_RESUME
                        {
                            st.since_resume.push_back(now);
                        }
                        while st
                            .recent
                            .front()
                            .is_some_and(|t| now.duration_since(*t) > RATE_SPAN)
                        {
                            st.recent.pop_front();
                        }
                        permit.sent = now;
                        None
                    }
                }
            };
            match pause {
                Some(p) => tokio::time::sleep_until(p).await,
                None => {
                    permit.started = true;
                    return permit;
                }
            }
        }
    }

    fn finish(&self, p: &Permit<'_>, outcome: Outcome) {
        let now = Instant::now();
        let mut st = self.lock();
        if p.holds_place {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        if !p.started {
            let free = st.free();
            drop(st);
            self.wake_some(free);
            return;
        }
        st.stats.requests += 1;
        // Refusals of requests sent before the last cut, or within a second of it, belong to
        // the episode that caused it (at most one cut a second).
        let episode = |cut: Option<Instant>| {
            cut.is_some_and(|c| p.sent < c || now.duration_since(c) < EPISODE)
        };
        let same_rate_episode = episode(st.last_rate_cut);
        let same_episode = episode(st.last_cut);
        match outcome {
            Outcome::NoAnswer => {}
            Outcome::Answered | Outcome::AnsweredSized => {
                // Only an answer whose time does not grow with what it carries says whether
                // the LMS is queueing.
                let slow = outcome == Outcome::Answered && {
                    let took = now.duration_since(p.sent);
                    let fastest = *st.fastest.get_or_insert(took);
                    if took < fastest {
                        st.fastest = Some(took);
                    }
                    // Smoothed, so that one answer held up (by this machine's own load, say)
                    // does not count as the LMS queueing.
                    let avg = st.latency.map_or(took.as_secs_f64(), |a| {
                        a + LATENCY_WEIGHT * (took.as_secs_f64() - a)
                    });
                    st.latency = Some(avg);
                    avg > fastest.as_secs_f64() * LATENCY_FACTOR + LATENCY_SLACK.as_secs_f64()
                };
                if slow {
                    if !same_episode {
                        st.cut_window(LATENCY_CUT, now);
                    }
                } else if p.window_full {
                    let grow = if st.slow_start { 1.0 } else { 1.0 / st.window };
                    st.window = (st.window + grow).min(self.ceiling as f64);
                }
                if p.rate_bound {
                    // A guess climbs fast; a measured rate by a share of it per round trip.
                    let raise = match st.latency {
                        Some(rtt) if st.measured && rtt > 0.0 => {
                            (RATE_RAISE_PER_ROUND_TRIP / rtt).min(RATE_RAISE_PER_SEC)
                        }
                        _ => RATE_RAISE_PER_SEC,
                    };
                    if let Some(r) = st.rate.as_mut() {
                        // One answer per 1/r seconds: +raise × r per second.
                        *r += raise;
                    }
                }
            }
            Outcome::Shed => {
                if !same_episode {
                    st.cut_window(CUT, now);
                }
            }
            Outcome::Throttled { pause, shed } => {
                st.stats.throttled += 1;
                st.last_throttle = Some(now);
                let until = now + pause;
                if st.paused_until.is_none_or(|u| u <= now) {
                    st.stats.pauses += 1;
                }
                st.paused_until = Some(st.paused_until.map_or(until, |u| u.max(until)));
                if shed {
                    if !same_episode {
                        st.cut_window(SHED_CUT, now);
                    }
                } else if !same_rate_episode {
                    // Below the rate that was being sent (the starts of the last second).
                    let span = st.recent.front().map_or(RATE_SPAN, |t| {
                        now.duration_since(*t)
                            .clamp(Duration::from_millis(250), RATE_SPAN)
                    });
                    let sending = st.recent.len() as f64 / span.as_secs_f64();
                    let from = st.rate.map_or(sending, |r| r.min(sending.max(1.0)));
                    // Leaving slow start, the rate overshot by up to twice: halve it.
                    let cut = if st.slow_start { SLOW_START_CUT } else { CUT };
                    let mut rate = from * cut;
                    // Since the last pause the LMS admitted what it refilled during the pause
                    // and since: that is its rate (a bucket smaller than the pause's refill
                    // only makes it lower).
                    if let (Some(resumed), Some(refill_from)) = (st.resumed, st.cut_sent) {
                        let admitted = st.since_resume.iter().filter(|t| **t < p.sent).count();
                        let span = p.sent.saturating_duration_since(refill_from);
                        if p.sent > resumed && admitted > 0 && !span.is_zero() {
                            let measured = admitted as f64 / span.as_secs_f64();
                            rate = measured.clamp(from * MIN_CUT, from * MAX_CUT);
                            st.measured = true;
                        }
                    }
                    st.rate = Some(rate.max(0.2));
                    st.cut_sent = Some(p.sent);
                    st.resumed = Some(st.paused_until.unwrap_or(now));
                    st.since_resume.clear();
                    st.slow_start = false;
                    st.last_rate_cut = Some(now);
                    st.stats.cuts += 1;
                    st.recent.clear();
                }
            }
        }
        let free = st.free();
        drop(st);
        self.wake_some(free);
    }

    /// Wakes up to `n` requests waiting for a place in the window (each looks again).
    fn wake_some(&self, n: usize) {
        for _ in 0..n.clamp(1, 8) {
            self.wake.notify_one();
        }
    }
}

impl State {
    /// Places free in the window.
    fn free(&self) -> usize {
        (self.window.floor().max(1.0) as usize).saturating_sub(self.in_flight)
    }

    /// The start time of the next request under the rate (now when there is none).
    fn reserve(&mut self) -> Instant {
        let now = Instant::now();
        let Some(rate) = self.rate else {
            return self.next_slot.max(now);
        };
        let slot = self.next_slot.max(now);
        self.next_slot = slot + Duration::from_secs_f64(1.0 / rate.max(0.001));
        slot
    }

    fn cut_window(&mut self, share: f64, now: Instant) {
        self.window = (self.window * share).max(1.0);
        self.slow_start = false;
        self.last_cut = Some(now);
        self.stats.cuts += 1;
    }
}

impl Permit<'_> {
    /// Reports how the request went.
    pub(crate) fn done(mut self, outcome: Outcome) {
        self.finished = true;
        self.pacer.finish(&self, outcome);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            self.pacer.finish(self, Outcome::NoAnswer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_window_grows_while_in_use_and_never_passes_the_ceiling() {
        let p = Pacer::new(6);
        assert_eq!(p.stats().window, INITIAL_WINDOW);
        for _ in 0..50 {
            let permits: Vec<_> = futures::future::join_all((0..6).map(|_| async {
                tokio::time::timeout(Duration::from_millis(1), p.acquire())
                    .await
                    .ok()
            }))
            .await;
            for x in permits.into_iter().flatten() {
                x.done(Outcome::Answered);
            }
        }
        assert_eq!(p.stats().window, 6.0);
        assert_eq!(p.stats().rate, None, "no rate before a throttle");
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_pauses_everyone_and_sets_a_rate_below_what_was_sent() {
        let p = Pacer::new(8);
        for _ in 0..20 {
            p.acquire().await.done(Outcome::Answered);
        }
        let a = p.acquire().await;
        let b = p.acquire().await;
        a.done(Outcome::Throttled {
            pause: Duration::from_millis(300),
            shed: false,
        });
        assert!(p.paused());
        // The second refusal of the same episode does not cut again.
        b.done(Outcome::Throttled {
            pause: Duration::from_millis(100),
            shed: false,
        });
        let s = p.stats();
        assert_eq!((s.throttled, s.pauses, s.cuts), (2, 1, 1));
        let rate = s.rate.unwrap();
        // 22 starts within (at least) a quarter of a second, halved.
        assert!(rate > 0.0 && rate <= 88.0 * SLOW_START_CUT + 1e-9, "{rate}");
        let before = Instant::now();
        let c = p.acquire().await;
        assert!(
            before.elapsed() >= Duration::from_millis(290),
            "waited out the shared pause"
        );
        c.done(Outcome::Answered);
        // Later requests are spaced by the rate.
        let t0 = Instant::now();
        for _ in 0..4 {
            p.acquire().await.done(Outcome::Answered);
        }
        assert!(t0.elapsed() >= Duration::from_secs_f64(3.0 / rate) - Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn shedding_and_slow_answers_cut_the_window() {
        let p = Pacer::new(32);
        for _ in 0..20 {
            let a = p.acquire().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            a.done(Outcome::Answered);
        }
        let w = p.stats().window;
        p.acquire().await.done(Outcome::Shed);
        assert!(p.stats().window <= w * CUT + 1e-9);
        assert!(!p.paused(), "a 503 without Retry-After pauses nobody");
        p.acquire().await.done(Outcome::Throttled {
            pause: Duration::from_millis(10),
            shed: true,
        });
        assert_eq!(p.stats().cuts, 1, "one episode, one cut");
        // The next cut comes from a later episode (at most one a second).
        tokio::time::sleep(EPISODE).await;
        let cuts = p.stats().cuts;
        let slow = || async {
            let a = p.acquire().await;
            tokio::time::sleep(Duration::from_millis(60)).await;
            a.done(Outcome::Answered);
        };
        slow().await;
        assert_eq!(p.stats().cuts, cuts, "one slow answer is not a trend");
        for _ in 0..8 {
            slow().await;
        }
        assert_eq!(
            p.stats().cuts,
            cuts + 1,
            "answers far slower than usual cut"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_request_taking_long_is_not_the_lms_queueing() {
        let p = Pacer::new(8);
        for _ in 0..5 {
            let a = p.acquire().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            a.done(Outcome::Answered);
        }
        // Bulk requests of many operations, each 200 times as slow as a small request: no
        // cut, and the window still grows.
        let w = p.stats().window;
        for _ in 0..10 {
            let a = p.acquire().await;
            tokio::time::sleep(EPISODE).await;
            a.done(Outcome::AnsweredSized);
        }
        assert_eq!(p.stats().cuts, 0);
        assert!(p.stats().window >= w);
        // After a throttle, sized answers that waited for the rate raise it, as others do.
        let a = p.acquire().await;
        tokio::time::sleep(EPISODE).await;
        a.done(Outcome::Throttled {
            pause: Duration::from_millis(10),
            shed: false,
        });
        let cut_to = p.stats().rate.unwrap_or_default();
        for _ in 0..10 {
            p.acquire().await.done(Outcome::AnsweredSized);
        }
        assert!(p.stats().rate.unwrap_or_default() > cut_to);
        tokio::time::sleep(EPISODE).await;
        let cuts = p.stats().cuts;
        // The same answers as ordinary requests would cut.
        for _ in 0..10 {
            let a = p.acquire().await;
            tokio::time::sleep(EPISODE).await;
            a.done(Outcome::Answered);
        }
        assert!(p.stats().cuts > cuts);
    }

    #[tokio::test(start_paused = true)]
    async fn a_guessed_rate_rises_by_two_percent_a_second_a_measured_one_per_round_trip() {
        // One answer that waited for the rate, after `rtt`: what the rate rises by.
        let raise = |measured: bool, rtt: Duration| {
            let p = Pacer::new(8);
            {
                let mut st = p.lock();
                st.rate = Some(50.0);
                st.measured = measured;
                st.latency = Some(rtt.as_secs_f64());
                st.fastest = Some(rtt);
            }
            Permit {
                pacer: &p,
                sent: Instant::now() - rtt,
                window_full: false,
                rate_bound: true,
                holds_place: false,
                started: true,
                finished: false,
            }
            .done(Outcome::Answered);
            p.stats().rate.unwrap() - 50.0
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-3;
        // Per answer (one every 1/r s): the share per second.
        let slow = Duration::from_millis(500);
        let fast = Duration::from_millis(100);
        assert!(close(raise(false, slow), RATE_RAISE_PER_SEC));
        assert!(close(raise(true, slow), RATE_RAISE_PER_ROUND_TRIP / 0.5));
        assert!(
            close(raise(true, fast), RATE_RAISE_PER_SEC),
            "at most 2 % a second"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_stops_waiting_gives_its_place_back() {
        let p = Pacer::new(1);
        let held = p.acquire().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(20), p.acquire())
                .await
                .is_err(),
            "the window is full"
        );
        drop(held);
        let again = tokio::time::timeout(Duration::from_millis(200), p.acquire()).await;
        assert!(again.is_ok(), "the place came back");
    }
}
