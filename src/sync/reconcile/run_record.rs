//! The run's record as it goes: progress ticks, per-user failures, decision traces and drift
//! notes.

use super::*;

impl<T: Target> Run<'_, '_, T> {
    pub(super) fn tick(&self, p: Progress) {
        if let Some(f) = &self.progress {
            f(&p);
        }
    }

    pub(super) fn fail_user(&mut self, entra_id: &str, user_name: Option<&str>, reason: String) {
        tracing::warn!(user = entra_id, user_name, %reason, "user failed to sync");
        self.report.counts.failed += 1;
        self.report.failures.push(UserFailure {
            entra_id: entra_id.to_string(),
            user_name: user_name.map(str::to_string),
            reason,
        });
    }

    /// Keeps the trace of a planned change until it is applied (`u`: the Graph user it was
    /// mapped from; `group`: the configured group it was listed in; `mapped`: the change's
    /// record is what the mapping produced).
    pub(super) fn trace_plan(
        &mut self,
        c: &PlannedChange,
        u: Option<&GraphUser>,
        group: Option<&GraphGroup>,
        out: Option<OutOfScope>,
        mapped: bool,
    ) {
        if !self.traces.enabled() {
            return;
        }
        let mut t = self.traces.start(&c.entra_id);
        let upn = u.and_then(|u| u.string("userPrincipalName"));
        t.user(None, upn.as_deref())
            .scope(Scope::of(out, group.map(listed_in).into_iter().collect()));
        t.plan(c);
        self.traces.wait(t, mapped);
    }

    /// A member that cannot be mapped: nothing to apply, so its trace is stored at once.
    pub(super) fn trace_unmapped(
        &self,
        u: &GraphUser,
        group: &GraphGroup,
        disabled: bool,
        reason: &str,
    ) -> Result<(), StoreError> {
        if !self.traces.enabled() {
            return Ok(());
        }
        let indexed = self.ctx.store.get_user(&u.id)?;
        let mut t = self.traces.start(&u.id);
        let upn = u.string("userPrincipalName");
        let out = disabled.then_some(OutOfScope::Disabled);
        t.user(
            indexed.as_ref().map(|e| e.user_name.as_str()),
            upn.as_deref(),
        )
        .scope(Scope::of(out, vec![listed_in(group)]))
        .failed(reason, false);
        if let Some(e) = &indexed {
            t.matched = Match::Index {
                target_id: e.target_id.clone(),
            };
        }
        self.ctx.store.put_traces(vec![self.traces.finish(t)])
    }

    /// A disabled member that was never provisioned is not created. Recorded once rather than
    /// at every run: the first such trace stays, and its time says since when.
    pub(super) fn trace_skipped(
        &self,
        d: &Desired,
        u: &GraphUser,
        group: &GraphGroup,
    ) -> Result<(), StoreError> {
        if !self.traces.enabled() || self.ctx.store.trace_is_skip(&d.entra_id)? {
            return Ok(());
        }
        let mut t = self.traces.start(&d.entra_id);
        let upn = u.string("userPrincipalName");
        t.user(Some(&d.user_name), upn.as_deref())
            .scope(Scope::of(
                Some(OutOfScope::Disabled),
                vec![listed_in(group)],
            ))
            .mapped(&d.record)
            .skipped(
                "disabled in Entra (accountEnabled = false) and never in the LMS: not created",
            );
        self.ctx.store.put_traces(vec![self.traces.finish(t)])
    }

    /// Deactivations the guard held back.
    pub(super) fn trace_held(
        &mut self,
        held: &[PlannedChange],
        trip: &GuardTrip,
    ) -> Result<(), StoreError> {
        if !self.traces.enabled() {
            return Ok(());
        }
        let why = trip.to_string();
        let mut traces = Vec::with_capacity(held.len());
        for c in held {
            let mut t = self.traces.take(c);
            t.held(&why);
            traces.push(self.traces.finish(t));
        }
        self.ctx.store.put_traces(traces)
    }

    /// The trace of an applied change. A follow-up change of a user already changed in this
    /// run (`counted` = false: the manager link, once the manager exists) amends that trace.
    pub(super) fn trace_applied(
        &mut self,
        c: &PlannedChange,
        matched: &Match,
        counted: bool,
    ) -> Result<Trace, StoreError> {
        if !counted {
            let stored = self.ctx.store.trace(&c.entra_id)?;
            if let Some(mut t) = stored.filter(|t| t.run == self.traces.run()) {
                t.amend(c, "manager link set once the manager was in the LMS");
                return Ok(self.traces.finish(t));
            }
        }
        let mut t = self.traces.take_applied(c);
        t.applied(c, matched);
        Ok(self.traces.finish(t))
    }

    /// The user's index entry with its record cut down to the managed keys.
    pub(super) fn indexed(&self, entra_id: &str) -> Result<Option<IndexEntry>, StoreError> {
        lookup(self.ctx.store, &self.actual, &self.managed, entra_id)
    }

    /// Deep runs: reads every LMS user (startIndex/count paging) and notes where the LMS
    /// differs from the index, so the plan repairs it.
    /// Records what the LMS really holds when it differs from the index; true if it does.
    pub(super) fn note_drift(&mut self, entra_id: String, e: IndexEntry, mut real: Record) -> bool {
        real.retain(|k, _| self.managed.contains(k));
        let mut known = e.record;
        known.retain(|k, _| self.managed.contains(k));
        // What the LMS does not keep as sent (it computes it) is not drift: taken as applied.
        for k in self.managed.iter().filter(|k| !self.caps.keeps(k)) {
            match known.get(k) {
                Some(v) => real.insert(k.clone(), v.clone()),
                None => real.remove(k),
            };
        }
        if real == known {
            return false;
        }
        tracing::info!(user = %entra_id, "LMS user differs from what was applied; repairing");
        self.actual.insert(entra_id, Some(real));
        true
    }
}
