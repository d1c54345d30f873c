//! Deactivations: candidates confirmed by a fresh Graph read, the guard checked, then applied.

use super::*;

/// One round of confirming reads (`Run::confirm_candidates`).
pub(super) struct Confirmation {
    /// What Graph says is due instead of a deactivation (withdrawn ones), to apply.
    apply: Vec<PlannedChange>,
    /// Deactivations Graph confirmed, with when each answer was sent.
    confirmed: Vec<(Candidate, PlannedChange, std::time::Instant)>,
    /// Confirmed by an answer too old to rest on: read again.
    slow: Vec<Candidate>,
    /// Graph answered 429 (or a passing 5xx): handed to the worker.
    throttled: Vec<Candidate>,
}

impl<T: Target> Run<'_, '_, T> {
    /// The deactivations the listing suggests: the shared budget first, then Graph's fresh
    /// word for each (`checkMemberGroups` and the user read again), decided again, applied.
    pub(super) async fn deactivate(&mut self) -> Result<(), RunError> {
        let candidates = std::mem::take(&mut self.candidates);
        if candidates.is_empty() {
            return Ok(());
        }
        let ctx = self.ctx;
        let n = candidates.len() as u64;
        let allow = self.opts.allow_mass_deactivation;
        let ids: Vec<String> = candidates
            .iter()
            .map(|c| c.change.entra_id.clone())
            .collect();
        let who: Vec<&str> = ids.iter().map(String::as_str).collect();
        // A dry run stores no trip and reads nothing more: it judges the candidates as planned.
        // A real run confirms each with Graph first and counts the confirmed, but a mass event
        // far past the budget is stopped without a read for each of its users.
        let verdict = if self.opts.dry_run {
            crate::sync::apply::guard_preview(ctx, &who, allow)?
        } else if !allow && crate::sync::apply::clearly_past_budget(ctx, &who)? {
            crate::sync::apply::guard_check(ctx, &who, allow)?
        } else {
            Ok(())
        };
        if let Err(trip) = verdict {
            let changes: Vec<PlannedChange> = candidates.into_iter().map(|c| c.change).collect();
            return self.held(changes, trip);
        }
        if allow {
            tracing::warn!(
                count = n,
                "mass-deactivation guard overridden by --allow-mass-deactivation"
            );
        }
        if self.opts.dry_run {
            // Shown as planned; a real run confirms each with Graph first.
            self.apply_all(candidates.into_iter().map(|c| c.change).collect(), true)
                .await?;
            return Ok(());
        }
        // Within the budget even if every candidate is confirmed: each chunk is written as
        // soon as Graph confirmed it (a change undone meanwhile is not written). Otherwise all
        // are confirmed first and the budget judges what Graph confirmed.
        let within = allow || crate::sync::apply::guard_preview(ctx, &who, false)?.is_ok();
        let chunk = (crate::graph::BATCH_LIMIT / 3).max(1);
        let mut confirmed: Vec<PlannedChange> = Vec::new();
        let mut rest = candidates;
        while !rest.is_empty() {
            let take = if within {
                chunk.min(rest.len())
            } else {
                rest.len()
            };
            let now: Vec<Candidate> = rest.drain(..take).collect();
            let decided = self.confirm_fresh(now).await?;
            if within {
                if let Err(trip) = self.apply_confirmed(decided, allow).await? {
                    // The worker spent the budget meanwhile: the rest is held unread.
                    let held: Vec<PlannedChange> = rest.drain(..).map(|c| c.change).collect();
                    if !held.is_empty() {
                        return self.held(held, trip);
                    }
                }
            } else {
                confirmed.extend(decided);
            }
        }
        if within {
            return Ok(());
        }
        // The budget, over what Graph confirmed.
        let ids: Vec<&str> = confirmed
            .iter()
            .filter(|c| c.action == Action::Deactivate)
            .map(|c| c.entra_id.as_str())
            .collect();
        if let Err(trip) = crate::sync::apply::guard_check(ctx, &ids, allow)? {
            let (held, rest): (Vec<PlannedChange>, Vec<PlannedChange>) = confirmed
                .into_iter()
                .partition(|c| c.action == Action::Deactivate);
            self.apply_all(rest, true).await?;
            return self.held(held, trip);
        }
        // A trip here was held and reported by `apply_confirmed`.
        let _ = self.apply_confirmed(confirmed, allow).await?;
        Ok(())
    }

    /// Applies what Graph confirmed, its deactivations first checked against the budget and
    /// counted in the guard's window by that check (`apply::Budget::check`; a worker running
    /// beside this run spends the same budget). A trip holds this chunk's deactivations and is
    /// returned.
    pub(super) async fn apply_confirmed(
        &mut self,
        changes: Vec<PlannedChange>,
        allow: bool,
    ) -> Result<Result<(), GuardTrip>, RunError> {
        let ids: Vec<&str> = changes
            .iter()
            .filter(|c| c.action == Action::Deactivate)
            .map(|c| c.entra_id.as_str())
            .collect();
        if let Err(trip) = crate::sync::apply::guard_check(self.ctx, &ids, allow)? {
            let (held, rest): (Vec<PlannedChange>, Vec<PlannedChange>) = changes
                .into_iter()
                .partition(|c| c.action == Action::Deactivate);
            self.apply_all(rest, true).await?;
            self.held(held, trip.clone())?;
            return Ok(Err(trip));
        }
        self.apply_all(changes, true).await?;
        Ok(Ok(()))
    }

    /// Confirms the candidates with Graph; a deactivation whose confirming answer is older than
    /// [`crate::sync::FRESH_READ_MAX_AGE`] is read again (twice at most), then left to the
    /// worker and the next run, as is a throttled one at once and one whose answer aged past
    /// the bound while others were read again: it never rests on an answer older than the
    /// directory may be.
    pub(super) async fn confirm_fresh(
        &mut self,
        candidates: Vec<Candidate>,
    ) -> Result<Vec<PlannedChange>, RunError> {
        let first_asked = chrono::Utc::now();
        let first = self.confirm_candidates(candidates).await?;
        let (mut apply, mut confirmed, mut again) = (first.apply, first.confirmed, first.slow);
        // A throttled one is not read again here: the send would wait out the Retry-After
        // while the others' answers age.
        let mut handed = first.throttled;
        for _ in 0..crate::sync::FRESH_READ_RETRIES {
            if again.is_empty() {
                break;
            }
            let more = self.confirm_candidates(again).await?;
            apply.extend(more.apply);
            confirmed.extend(more.confirmed);
            handed.extend(more.throttled);
            again = more.slow;
        }
        handed.extend(again);
        // The rounds after the first age the answers decided before them: a deactivation
        // whose answer is past the bound by now is handed on like a slow one.
        for (cand, change, asked) in confirmed {
            if asked.elapsed() > crate::sync::FRESH_READ_MAX_AGE {
                handed.push(cand);
            } else {
                apply.push(change);
            }
        }
        let again = handed;
        if !again.is_empty() {
            let n = again.len();
            // Handed to the incremental worker, which reads them again on its own (at once
            // in `serve`; at its next start otherwise), and to the next run. Graph said they
            // were gone when first asked: the worker's settling time counts from then.
            let hints: Vec<crate::store::queue::QueueItem> = again
                .iter()
                .map(|c| {
                    let mut it =
                        crate::store::queue::QueueItem::follow_up(c.change.entra_id.clone());
                    it.missing_since = Some(first_asked);
                    it
                })
                .collect();
            self.ctx.store.enqueue(&hints)?;
            for cand in again {
                let mut t = self.traces.take(&cand.change);
                t.skipped(SLOW_CONFIRMATION);
                self.pipe.traces.push(self.traces.finish(t));
            }
            tracing::warn!(
                count = n,
                "deactivations left to the next run: {SLOW_CONFIRMATION}"
            );
            self.report.notes.push(format!(
                "{n} deactivations were left to the next run: {SLOW_CONFIRMATION}"
            ));
        }
        Ok(apply)
    }

    /// Reads the candidates again from Graph (user, manager, `checkMemberGroups`) and decides
    /// again: what Graph confirms, or what it says is due instead (a withdrawn deactivation).
    pub(super) async fn confirm_candidates(
        &mut self,
        candidates: Vec<Candidate>,
    ) -> Result<Confirmation, RunError> {
        let ctx = self.ctx;
        let cfg = ctx.cfg;
        let ids: Vec<String> = candidates
            .iter()
            .map(|c| c.change.entra_id.clone())
            .collect();
        let mapping = &cfg.mapping;
        let user_select = mapping.user_select();
        let manager_select = mapping.manager_select();
        // One `$batch` per user, a few at a time (`GraphClient::fresh_reads`).
        let mut reads = ctx
            .graph
            .fresh_reads(&ids, &user_select, manager_select.as_deref(), &cfg.groups)
            .await?;
        let mut slow = Vec::new();
        let mut throttled = Vec::new();
        let mut confirmed = Vec::new();
        let mut apply = Vec::new();
        let mut withdrawn = 0u64;
        for cand in candidates {
            let id = cand.change.entra_id.clone();
            let read = match reads.remove(&id) {
                Some(Ok(r)) => r,
                // Throttled (or a passing 5xx): asked again like a slow answer (the pacer
                // holds the send for the Retry-After).
                Some(Err(e)) if e.is_transient() => {
                    tracing::debug!(user = %id, error = %e, "confirming read throttled; handed to the worker");
                    throttled.push(cand);
                    continue;
                }
                Some(Err(e)) => {
                    let reason = format!(
                        "deactivation deferred to the next run: Graph could not confirm it ({e})"
                    );
                    let mut t = self.traces.take(&cand.change);
                    t.failed(&reason, false);
                    self.pipe.traces.push(self.traces.finish(t));
                    self.fail_user(&id, Some(&cand.change.user_name), reason);
                    continue;
                }
                None => continue,
            };
            // How old this user's answers are now, about to be decided and written.
            let asked = read.asked;
            let stale = asked.elapsed() > crate::sync::FRESH_READ_MAX_AGE;
            let mapped = read
                .user
                .as_ref()
                .map(|u| self.map_fresh(u, read.manager.as_ref()));
            let mref = match mapped.as_ref().and_then(|m| m.as_ref().ok()) {
                Some(d) if self.link_manager => match d.manager_entra_id.as_deref() {
                    Some(mid) => match self.manager_target(mid)? {
                        Some(t) => ManagerRef::Known(t),
                        None => ManagerRef::None,
                    },
                    None => ManagerRef::None,
                },
                _ => ManagerRef::None,
            };
            let user = match (&read.user, &mapped) {
                (Some(u), Some(m)) => UserFact::Present {
                    user: u,
                    mapped: m.as_ref(),
                },
                _ => UserFact::Gone { deleted: true },
            };
            let facts = Facts {
                user,
                membership: if read.member_of.is_empty() {
                    Membership::NotMember
                } else {
                    Membership::Member
                },
                confirmed: true,
                existing: Some(&cand.existing),
                manager: &mref,
            };
            let d = decide::decide(&id, &facts, false);
            match d.verdict {
                Verdict::Change(c) if c.action == Action::Deactivate => {
                    if stale {
                        slow.push(cand);
                    } else {
                        confirmed.push((cand, c, asked));
                    }
                }
                other => {
                    withdrawn += 1;
                    tracing::info!(user = %id, now = ?other, "deactivation withdrawn: Graph says otherwise now");
                    // The planned trace gives way to what Graph says now.
                    let _ = self.traces.take(&cand.change);
                    if let Verdict::Change(c) = other {
                        apply.push(c);
                    }
                }
            }
        }
        if withdrawn > 0 {
            self.report.notes.push(format!(
                "{withdrawn} deactivations were withdrawn: Graph said the user is an enabled member again when asked just before"
            ));
        }
        Ok(Confirmation {
            apply,
            confirmed,
            slow,
            throttled,
        })
    }

    /// The guard stopped these deactivations: traced as held, reported, none applied.
    pub(super) fn held(
        &mut self,
        changes: Vec<PlannedChange>,
        trip: GuardTrip,
    ) -> Result<(), RunError> {
        tracing::error!(
            would = trip.would_deactivate,
            allowed = trip.allowed,
            used = trip.used,
            "mass-deactivation guard tripped"
        );
        if self.opts.dry_run {
            self.report.changes.extend(changes);
        } else {
            self.trace_held(&changes, &trip)?;
        }
        self.report.guard = Some(trip);
        Ok(())
    }

    /// Maps a user read to confirm a deactivation (record cut to the managed keys).
    pub(super) fn map_fresh(
        &self,
        u: &GraphUser,
        manager: Option<&GraphUser>,
    ) -> Result<Desired, MapFailure> {
        self.ctx.cfg.mapping.apply(u, manager).map(|mut d| {
            d.record.retain(|k, _| self.managed.contains(k));
            d
        })
    }
}
