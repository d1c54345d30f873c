//! Planning members against the index: chunks planned when nothing else is ready, and members
//! parked until the manager being created in this run has its LMS id.

use super::*;

impl<T: Target> Run<'_, '_, T> {
    /// Plans up to `n` members of the queued pages. Changes go to the write stream; a member
    /// whose manager is being created in this run waits for that create, so the manager link
    /// is set in the member's own request instead of by an extra PATCH at the end. A new user
    /// whose manager's create is queued and not started is planned at once where the target
    /// links in flight (`Target::links_in_flight`), right behind it.
    pub(super) fn plan_some(&mut self, n: usize) -> Result<(), RunError> {
        let Some(mut page) = self.pipe.pages.pop_front() else {
            return Ok(());
        };
        let waits = !self.opts.dry_run;
        for _ in 0..n {
            let Some((d, existing, u)) = page.members.pop_front() else {
                break;
            };
            let mref = match (&d.manager_entra_id, self.link_manager) {
                (Some(mid), true) => match self.manager_target(mid)? {
                    Some(t) => ManagerRef::Known(t),
                    None => {
                        if waits
                            && self.pipe.planned.contains(mid)
                            && self.pipe.pending.contains(&d.entra_id)
                            && self.ctx.target.links_in_flight()
                        {
                            // The manager's create is on its way: this create is linked to
                            // it in flight (SCIM bulk), without waiting for its answer.
                            let link = Some(mid.clone());
                            self.plan_deferred(&d, existing.as_ref(), &u, &page.group, link)?;
                            continue;
                        }
                        let earlier = match page.depths.get(mid) {
                            Some(dm) => page.depths.get(&d.entra_id).is_some_and(|du| dm < du),
                            None => true,
                        };
                        let cycle = self.waits_in_cycle(&d.entra_id, mid);
                        if waits && earlier && !cycle && self.pipe.pending.contains(mid) {
                            let mid = mid.clone();
                            let held = self.held_with(&d.entra_id);
                            self.pipe.waits_on.insert(d.entra_id.clone(), mid.clone());
                            self.pipe
                                .waiting
                                .entry(mid.clone())
                                .or_default()
                                .push(Waiter {
                                    desired: d,
                                    existing,
                                    user: u,
                                    group: page.group.clone(),
                                });
                            self.pipe.waiting_count += 1;
                            self.hold(&mid, held)?;
                            continue;
                        }
                        if waits
                            && self.pipe.listing
                            && !cycle
                            && !self.pipe.pending.contains(mid)
                            && self.pipe.pending.contains(&d.entra_id)
                        {
                            // Not listed yet: maybe on a later page. Created first, it is
                            // linked in this member's own write.
                            let mid = mid.clone();
                            self.park(
                                mid,
                                Waiter {
                                    desired: d,
                                    existing,
                                    user: u,
                                    group: page.group.clone(),
                                },
                            )?;
                            continue;
                        }
                        self.deferred
                            .push((d.entra_id.clone(), d.manager_entra_id.clone()));
                        ManagerRef::Deferred
                    }
                },
                _ => ManagerRef::None,
            };
            self.plan_one(&d, existing.as_ref(), &u, &page.group, mref, None)?;
        }
        if !page.members.is_empty() {
            self.pipe.pages.push_front(page);
        }
        Ok(())
    }

    /// Whether `member` waiting for `manager` would close a cycle of waits.
    pub(super) fn waits_in_cycle(&self, member: &str, manager: &str) -> bool {
        let mut cur = manager;
        for _ in 0..64 {
            if cur == member {
                return true;
            }
            match self.pipe.waits_on.get(cur) {
                Some(next) => cur = next,
                None => return false,
            }
        }
        // A chain this long: do not wait.
        true
    }

    /// Holds a member until its manager is listed (or the listing ends).
    pub(super) fn park(&mut self, manager: String, w: Waiter) -> Result<(), StoreError> {
        let held = self.held_with(&w.desired.entra_id);
        self.pipe
            .waits_on
            .insert(w.desired.entra_id.clone(), manager.clone());
        let list = self.pipe.parked.entry(manager.clone()).or_default();
        if list.is_empty() {
            self.pipe.parked_order.push_back(manager.clone());
        }
        list.push(w);
        self.pipe.parked_count += 1;
        self.hold(&manager, held)
    }

    /// `member` and the members waiting behind it.
    fn held_with(&self, member: &str) -> usize {
        1 + self.pipe.behind.get(member).copied().unwrap_or(0)
    }

    /// `held` more members wait for `first` (a member being created, or a manager not listed
    /// yet): counted for it and up its chain of waits. A manager not listed yet at the top
    /// of the chain is let go once it holds [`UNPARK_HELD`] times the members parked for it,
    /// and the oldest ones while more than [`MAX_PARKED`] members are held behind them.
    fn hold(&mut self, first: &str, held: usize) -> Result<(), StoreError> {
        let mut top = first.to_string();
        for _ in 0..64 {
            *self.pipe.behind.entry(top.clone()).or_default() += held;
            match self.pipe.waits_on.get(&top) {
                Some(next) => top = next.clone(),
                None => break,
            }
        }
        if let Some(parked) = self.pipe.parked.get(&top) {
            self.pipe.held_parked += held;
            let behind = self.pipe.behind.get(&top).copied().unwrap_or(0);
            if behind >= UNPARK_HELD.saturating_mul(parked.len()) {
                self.unpark_for(&top, false)?;
            }
        }
        while self.pipe.held_parked > MAX_PARKED {
            let Some(oldest) = self.pipe.parked_order.pop_front() else {
                break;
            };
            self.unpark(&oldest)?;
        }
        Ok(())
    }

    /// The manager `entra_id` was listed in this page (`creating`: its create is queued) or
    /// the listing ended: the members parked for it wait for its create or are planned now.
    pub(super) fn unpark_for(&mut self, entra_id: &str, creating: bool) -> Result<(), StoreError> {
        if !self.pipe.parked.contains_key(entra_id) {
            return Ok(());
        }
        if creating && self.pipe.pending.contains(entra_id) {
            let ws = self.pipe.parked.remove(entra_id).unwrap_or_default();
            self.pipe.parked_count = self.pipe.parked_count.saturating_sub(ws.len());
            self.pipe.waiting_count += ws.len();
            // Held behind a member being created now (counted up its chain once it is planned).
            let behind = self.pipe.behind.get(entra_id).copied().unwrap_or(0);
            self.pipe.held_parked = self.pipe.held_parked.saturating_sub(behind);
            self.pipe.parked_order.retain(|m| m != entra_id);
            self.pipe
                .waiting
                .entry(entra_id.to_string())
                .or_default()
                .extend(ws);
            return Ok(());
        }
        self.pipe.parked_order.retain(|m| m != entra_id);
        self.unpark(entra_id)
    }

    /// Plans the members parked for `manager` with what is known of it now.
    pub(super) fn unpark(&mut self, manager: &str) -> Result<(), StoreError> {
        let ws = self.pipe.parked.remove(manager).unwrap_or_default();
        self.pipe.parked_count = self.pipe.parked_count.saturating_sub(ws.len());
        let behind = self.pipe.behind.remove(manager).unwrap_or(0);
        self.pipe.held_parked = self.pipe.held_parked.saturating_sub(behind);
        for w in ws {
            let target = self.manager_target(manager)?;
            self.plan_waiter(w, target)?;
        }
        Ok(())
    }

    /// Plans a member that waited for its manager: linked to it when it is in the target
    /// (`target`), else linked at the end of the run.
    pub(super) fn plan_waiter(
        &mut self,
        w: Waiter,
        target: Option<String>,
    ) -> Result<(), StoreError> {
        self.pipe.waits_on.remove(&w.desired.entra_id);
        match target {
            Some(t) => self.plan_one(
                &w.desired,
                w.existing.as_ref(),
                &w.user,
                &w.group,
                ManagerRef::Known(t),
                None,
            ),
            None => self.plan_deferred(&w.desired, w.existing.as_ref(), &w.user, &w.group, None),
        }
    }

    /// Plans a member whose manager is not in the target yet: its link is settled at the end
    /// of the run, unless its create is linked in flight to `link` (a manager whose create is
    /// queued) first.
    fn plan_deferred(
        &mut self,
        d: &Desired,
        existing: Option<&IndexEntry>,
        u: &GraphUser,
        group: &GraphGroup,
        link: Option<String>,
    ) -> Result<(), StoreError> {
        self.deferred
            .push((d.entra_id.clone(), d.manager_entra_id.clone()));
        self.plan_one(d, existing, u, group, ManagerRef::Deferred, link)
    }

    /// The create of `manager` is queued, and the target links creates in flight: the creates
    /// that wait for it are planned now, to be linked to it in their own write (updates wait
    /// for its answer, as without).
    fn release_creates(&mut self, manager: &str) -> Result<(), StoreError> {
        let Some(ws) = self.pipe.waiting.remove(manager) else {
            return Ok(());
        };
        let (go, stay): (Vec<Waiter>, Vec<Waiter>) = ws
            .into_iter()
            .partition(|w| self.pipe.pending.contains(&w.desired.entra_id));
        if !stay.is_empty() {
            self.pipe.waiting.insert(manager.to_string(), stay);
        }
        self.pipe.waiting_count = self.pipe.waiting_count.saturating_sub(go.len());
        let held: usize = go.iter().map(|w| self.held_with(&w.desired.entra_id)).sum();
        if let Some(b) = self.pipe.behind.get_mut(manager) {
            *b = b.saturating_sub(held);
        }
        for w in go {
            self.pipe.waits_on.remove(&w.desired.entra_id);
            let link = Some(manager.to_string());
            self.plan_deferred(&w.desired, w.existing.as_ref(), &w.user, &w.group, link)?;
        }
        Ok(())
    }

    /// The listing ended: nobody waits for a manager who was not listed.
    pub(super) fn unpark_all(&mut self) -> Result<(), StoreError> {
        self.pipe.listing = false;
        while let Some(m) = self.pipe.parked_order.pop_front() {
            self.unpark(&m)?;
        }
        Ok(())
    }

    /// Plans one mapped member with what is known of its manager; `link`: a manager whose
    /// create is queued, for a create to be linked to in flight.
    pub(super) fn plan_one(
        &mut self,
        d: &Desired,
        existing: Option<&IndexEntry>,
        u: &GraphUser,
        group: &GraphGroup,
        mref: ManagerRef,
        link: Option<String>,
    ) -> Result<(), StoreError> {
        let mut queued_create = false;
        let facts = Facts {
            user: UserFact::Present {
                user: u,
                mapped: Ok(d),
            },
            membership: Membership::Member,
            confirmed: false,
            existing,
            manager: &mref,
        };
        // A create's diff lists its record again: only a dry run shows it.
        match decide::decide(&d.entra_id, &facts, self.opts.dry_run).verdict {
            Verdict::Skip => {
                self.report.counts.skipped += 1;
                self.trace_skipped(d, u, group)?;
            }
            Verdict::Unchanged { remember_manager } => {
                self.report.counts.unchanged += 1;
                if remember_manager {
                    self.remember
                        .push((d.entra_id.clone(), d.manager_entra_id.clone()));
                }
            }
            Verdict::Confirm => {
                // A disabled member: deactivated once Graph confirms it, after the listing.
                if let (Some(mut c), Some(e)) = (
                    plan::plan_member_with(d, existing, &mref, self.opts.dry_run),
                    existing,
                ) {
                    c.reason = Some(OutOfScope::Disabled.describe().to_string());
                    let out = Some(OutOfScope::Disabled);
                    self.trace_plan(&c, Some(u), Some(group), out, true);
                    self.candidates.push(Candidate {
                        change: c,
                        existing: e.clone(),
                    });
                }
            }
            Verdict::Fail(reason) => {
                self.fail_user(&d.entra_id, Some(&d.user_name), reason);
            }
            Verdict::Change(c) => {
                let out = (!is_active(&c.record)).then_some(OutOfScope::Disabled);
                self.trace_plan(&c, Some(u), Some(group), out, true);
                if self.opts.dry_run {
                    self.count(c.action);
                    self.report.changes.push(&c);
                } else {
                    queued_create = c.action == Action::Create;
                    self.pipe.ready.push_back(c);
                }
            }
        }
        if queued_create {
            if let Some(m) = link {
                self.pipe.links.insert(d.entra_id.clone(), m);
            }
            if self.pipe.pending.contains(&d.entra_id) && self.ctx.target.links_in_flight() {
                // Its reports' creates need not wait for its answer.
                self.pipe.planned.insert(d.entra_id.clone());
                self.release_creates(&d.entra_id)?;
            }
        }
        if !queued_create {
            // Not created after all: whoever waits for it gets the link at the end.
            self.resolve(&d.entra_id, None)?;
        }
        Ok(())
    }

    /// The create of `entra_id` answered (`target`: its LMS id, `None`: it failed or was not
    /// made): plans the members that waited for it as their manager.
    pub(super) fn resolve(
        &mut self,
        entra_id: &str,
        target: Option<&str>,
    ) -> Result<(), StoreError> {
        if !self.pipe.pending.remove(entra_id) {
            return Ok(());
        }
        self.pipe.planned.remove(entra_id);
        self.pipe.behind.remove(entra_id);
        let ws = self.pipe.waiting.remove(entra_id).unwrap_or_default();
        self.pipe.waiting_count = self.pipe.waiting_count.saturating_sub(ws.len());
        for w in ws {
            self.plan_waiter(w, target.map(str::to_string))?;
        }
        Ok(())
    }

    /// A group that had members and now has none is an error, never "everyone left".
    pub(super) fn check_group_size(
        &mut self,
        id: &str,
        name: &str,
        count: u64,
        active_before: u64,
    ) -> Result<(), RunError> {
        if count > 0 {
            return Ok(());
        }
        let before: Option<u64> = self.ctx.store.get_meta(&format!("group_count/{id}"))?;
        let suspicious =
            before.unwrap_or(0) > 0 || (self.ctx.cfg.groups.len() == 1 && active_before > 0);
        if suspicious && self.opts.allow_mass_deactivation {
            tracing::warn!(
                group = id,
                "group is empty; accepted because of --allow-mass-deactivation"
            );
        } else if suspicious {
            return Err(RunError::Source(format!(
                "group {name:?} ({id}) returned no members but had {} before; refusing to treat that as everyone leaving. Check the group in Entra and the app's GroupMember.Read.All permission; if it really is empty now, run once with --allow-mass-deactivation",
                before.unwrap_or(active_before)
            )));
        }
        self.report
            .notes
            .push(format!("group {name:?} ({id}) has no user members"));
        Ok(())
    }
}
