//! Listing the members: the membership mirror rebuilt, pages taken from the feed and mapped.

use super::*;

impl<T: Target> Run<'_, '_, T> {
    /// Rebuilds the incremental worker's membership mirror (direct members of every group in
    /// the tree) from Graph, so that what a lost membership notification hid is healed. Only
    /// where `serve` keeps a mirror (a configured group has a delta link).
    pub(super) async fn rebuild_mirror(&mut self) -> Result<(), RunError> {
        let store = self.ctx.store;
        let cfg = self.ctx.cfg;
        let mut has_mirror = false;
        for g in &cfg.groups {
            has_mirror |= store.delta_link(g)?.is_some();
        }
        if !has_mirror {
            return Ok(());
        }
        let before = store.group_tree(&cfg.groups)?;
        let mut todo: VecDeque<String> = cfg.groups.iter().cloned().collect();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut listed: Vec<(String, Vec<(String, crate::store::state::MemberKind)>)> = Vec::new();
        while let Some(g) = todo.pop_front() {
            if !seen.insert(g.clone()) || seen.len() > 10_000 {
                continue;
            }
            let members = self.ctx.graph.direct_members(&g).await?;
            for (m, k) in &members {
                if *k == crate::store::state::MemberKind::Group && !seen.contains(m) {
                    todo.push_back(m.clone());
                }
            }
            listed.push((g, members));
        }
        // What the mirror said before, to find whom the rebuild changes: a change made while
        // this run listed (its notification already queued) must still reach those users.
        let mut old: HashMap<String, BTreeSet<String>> = HashMap::new();
        for g in before.iter().chain(listed.iter().map(|(g, _)| g)) {
            if !old.contains_key(g) {
                let users = store
                    .direct_members(g)?
                    .into_iter()
                    .filter(|(_, k)| *k == crate::store::state::MemberKind::User)
                    .map(|(m, _)| m)
                    .collect();
                old.insert(g.clone(), users);
            }
        }
        for (g, members) in &listed {
            store.replace_members(g, members)?;
        }
        let after = store.group_tree(&cfg.groups)?;
        let mut look: BTreeSet<String> = BTreeSet::new();
        for (g, members) in &listed {
            let now: BTreeSet<String> = members
                .iter()
                .filter(|(_, k)| *k == crate::store::state::MemberKind::User)
                .map(|(m, _)| m.clone())
                .collect();
            if let Some(was) = old.get(g) {
                look.extend(was.symmetric_difference(&now).cloned());
                // Gone from the listing: maybe soft-deleted (hidden from listings, not from
                // group delta, which will not announce its return when it is restored).
                for gone in was.difference(&now) {
                    store.mark_vanished(gone)?;
                }
            }
        }
        for g in before.difference(&after) {
            look.extend(old.get(g).into_iter().flatten().cloned());
            store.forget_group(g)?;
        }
        if !look.is_empty() {
            tracing::info!(
                users = look.len(),
                "the membership mirror changed under this run; those users are looked at again"
            );
            let hints: Vec<crate::store::queue::QueueItem> = look
                .into_iter()
                .map(crate::store::queue::QueueItem::follow_up)
                .collect();
            store.enqueue(&hints)?;
        }
        if before != after {
            self.report.tree_changed = true;
            tracing::info!(
                before = before.len(),
                after = after.len(),
                "the group tree changed; subscriptions follow"
            );
        }
        for g in &cfg.groups {
            store.remove_meta(&format!("group_stopped/{g}"))?;
        }
        Ok(())
    }

    /// One message of the member reader.
    pub(super) fn take_feed(&mut self, item: Feed, active_before: u64) -> Result<(), RunError> {
        match item {
            Feed::Page {
                users,
                malformed,
                group,
            } => {
                for m in malformed {
                    self.fail_user("?", None, format!("Graph returned a malformed member: {m}"));
                }
                self.report.counts.members += users.len() as u64;
                self.tick(Progress::PageRead {
                    members: self.report.counts.members,
                });
                self.begin_page(users, group)
            }
            Feed::GroupDone { group, count } => {
                self.check_group_size(&group.id, &group.display_name, count, active_before)?;
                self.report.groups.push(GroupSummary {
                    id: group.id.clone(),
                    name: group.display_name.clone(),
                    members: count,
                });
                Ok(())
            }
        }
    }

    /// The LMS id a manager link may point at now: the manager applied in this run (maybe not
    /// written yet) or indexed, and active in the LMS. `None` for a manager who is not in the
    /// LMS, or not active there (it left scope): its reports get no link (or lose it).
    pub(super) fn manager_target(&mut self, entra_id: &str) -> Result<Option<String>, StoreError> {
        if self.pipe.deactivated.contains(entra_id) {
            return Ok(None);
        }
        if let Some(t) = self.pipe.unwritten.get(entra_id) {
            return Ok(Some(t.clone()));
        }
        if let Some(None) = self.actual.get(entra_id) {
            // Indexed, but gone from the LMS (a deep run found out): no link to it.
            return Ok(None);
        }
        if let Some(t) = self.pipe.managers.get(entra_id) {
            return Ok(Some(t.clone()));
        }
        // Found in the index, an LMS id stays what it is until the user is applied in this
        // run (which drops it here: the applied id is in `unwritten`, then in the index).
        let found = self.ctx.store.linkable_target(entra_id)?;
        if let Some(t) = &found {
            self.pipe.managers.insert(entra_id.to_string(), t.clone());
        }
        Ok(found)
    }

    /// Takes one page of mapped members: reports those that cannot be mapped, works out which
    /// members are created in this page and how deep each sits in a chain of such managers,
    /// and queues the page for planning (`plan_some`), which the drive does a few members at a
    /// time so that LMS answers keep being picked up while a page is planned.
    pub(super) fn begin_page(
        &mut self,
        fresh: Vec<(GraphUser, Result<Mapped, MapFailure>)>,
        group: GraphGroup,
    ) -> Result<(), RunError> {
        let mut members: VecDeque<(Desired, Option<IndexEntry>, GraphUser)> =
            VecDeque::with_capacity(fresh.len());
        let mut unmapped = Vec::new();
        for (u, d) in fresh {
            match d {
                Ok((d, existing)) => members.push_back((d, existing, u)),
                Err(f) => {
                    if self.pipe.parked.contains_key(&u.id) {
                        unmapped.push(u.id.clone());
                    }
                    let name = u.string("userPrincipalName");
                    let existing = self.ctx.store.get_user(&u.id)?.map(|mut e| {
                        e.record.retain(|k, _| self.managed.contains(k));
                        e
                    });
                    let none = ManagerRef::None;
                    let facts = Facts {
                        user: UserFact::Present {
                            user: &u,
                            mapped: Err(&f),
                        },
                        membership: Membership::Member,
                        confirmed: false,
                        existing: existing.as_ref(),
                        manager: &none,
                    };
                    let d = decide::decide(&u.id, &facts, false);
                    match (d.verdict, existing) {
                        // A disabled account that can no longer be mapped (e.g. its mailbox
                        // was removed at offboarding) must still be deactivated.
                        (Verdict::Confirm, Some(e)) => {
                            if let Some(mut c) = plan::plan_departure(&u.id, &e) {
                                c.reason = Some(OutOfScope::Disabled.describe().to_string());
                                let out = Some(OutOfScope::Disabled);
                                self.trace_plan(&c, Some(&u), Some(&group), out, false);
                                self.candidates.push(Candidate {
                                    change: c,
                                    existing: e,
                                });
                            }
                        }
                        (Verdict::Fail(reason), _) => {
                            let disabled = d.out == Some(OutOfScope::Disabled);
                            self.trace_unmapped(&u, &group, disabled, &reason)?;
                            self.fail_user(&u.id, name.as_deref(), reason);
                        }
                        _ => self.report.counts.unchanged += 1,
                    }
                }
            }
        }
        for id in unmapped {
            self.unpark_for(&id, false)?;
        }
        let creating: HashSet<&str> = members
            .iter()
            .filter(|(d, e, _)| e.is_none() && is_active(&d.record))
            .map(|(d, _, _)| d.entra_id.as_str())
            .collect();
        let manager_of: HashMap<&str, &str> = members
            .iter()
            .filter_map(|(d, _, _)| Some((d.entra_id.as_str(), d.manager_entra_id.as_deref()?)))
            .collect();
        // Depth in the chain of managers created in this page (capped: cycles exist). A member
        // waits only for a manager of smaller depth, or one of an earlier page: no wait cycle.
        let depth = |id: &str| {
            let (mut n, mut cur) = (0usize, id);
            while let Some(m) = manager_of.get(cur) {
                if n >= 8 || !creating.contains(m) {
                    break;
                }
                n += 1;
                cur = m;
            }
            n
        };
        let depths: HashMap<String, usize> = members
            .iter()
            .filter(|(d, _, _)| {
                d.manager_entra_id.is_some() || creating.contains(d.entra_id.as_str())
            })
            .map(|(d, _, _)| (d.entra_id.clone(), depth(&d.entra_id)))
            .collect();
        if !self.opts.dry_run {
            self.pipe
                .pending
                .extend(creating.iter().map(|id| id.to_string()));
        }
        drop(manager_of);
        // Members parked for a manager listed in this page: they wait for its create, or are
        // planned now when it is not created.
        let listed: Vec<(String, bool)> = if self.pipe.parked.is_empty() {
            Vec::new()
        } else {
            members
                .iter()
                .map(|(d, _, _)| d.entra_id.as_str())
                .filter(|id| self.pipe.parked.contains_key(*id))
                .map(|id| (id.to_string(), creating.contains(id)))
                .collect()
        };
        drop(creating);
        for (id, creating) in listed {
            self.unpark_for(&id, creating)?;
        }
        self.pipe.pages.push_back(PageWork {
            group,
            members,
            depths,
        });
        Ok(())
    }
}
