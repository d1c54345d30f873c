//! The LMS writes as one stream, their index entries and traces, and the managers settled at
//! the end.

use super::*;

impl<T: Target> Run<'_, '_, T> {
    /// Applies `changes` with the target's bounded concurrency and records the results.
    /// `counted` is false for follow-up changes of users already counted in this run.
    pub(super) async fn apply_all(
        &mut self,
        changes: Vec<PlannedChange>,
        counted: bool,
    ) -> Result<(), RunError> {
        // Nothing to send may still leave traces to write (a deactivation Graph could not
        // confirm, or left to the next run).
        if changes.is_empty() && self.pipe.traces.is_empty() && self.pipe.entries.is_empty() {
            return Ok(());
        }
        if self.opts.dry_run {
            if counted {
                for c in &changes {
                    self.count(c.action);
                }
                self.report.changes.extend(changes);
            }
            return Ok(());
        }
        self.pipe.ready.extend(changes);
        self.drive(None, counted).await
    }

    /// Runs the write stream until everything ready (and, with a member feed, everything the
    /// feed brings) is applied and its index entries and traces are written. Keeps the
    /// target's `concurrency` changes in flight; plans the next page when fewer than twice that
    /// many are left to start. Before changes are sent their intents are stored and made
    /// durable, a chunk at a time while earlier chunks are in flight (`store::intents`); a
    /// chunk's record is settled once its index entries are written. On an error nothing new
    /// is started, what is in flight is finished and recorded, and the first error is returned.
    pub(super) async fn drive(
        &mut self,
        mut feed: Option<(&mut FeedRx, u64)>,
        counted: bool,
    ) -> Result<(), RunError> {
        // With SCIM bulk, enough writes in flight to fill its requests.
        let conc = self
            .ctx
            .target
            .write_slots()
            .unwrap_or(self.ctx.cfg.target.concurrency)
            .max(1);
        if feed.is_some() {
            self.pipe.listing = true;
        }
        let ctx = self.ctx;
        let store = ctx.store;
        let managed = Arc::new(self.managed.clone());
        let start = |c: PlannedChange, chunk: IntentId, link: Option<String>| {
            let managed = Arc::clone(&managed);
            async move {
                let span =
                    tracing::info_span!("apply", user = %c.entra_id, action = c.action.as_str());
                let r = apply_change_linking(ctx, &managed, &c, link.as_deref())
                    .instrument(span)
                    .await;
                (c, chunk, r)
            }
        };
        type Durable<'s, E = StoreError> =
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), E>> + Send + 's>>;
        let mut announcing: Option<(Vec<PlannedChange>, IntentId, Durable<'_>)> = None;
        let mut inflight = FuturesUnordered::new();
        let mut writing: Option<WriteJob> = None;
        // A failure that may be the LMS's, not the user's: does it answer at all? Asked beside
        // the writes in flight, which go on being driven meanwhile: the probe's own LMS
        // request waits for a place in the pacer's window that they hold.
        let mut probing: Option<Durable<'_, RunError>> = None;
        let mut error: Option<RunError> = None;
        loop {
            if error.is_none() && self.probe_due && probing.is_none() {
                self.probe_due = false;
                probing = Some(Box::pin(crate::sync::apply::probe(ctx)));
            }
            // No new write while the probe is out.
            if error.is_none() && probing.is_none() {
                let queued = self.pipe.armed.len();
                if announcing.is_none() && !self.pipe.ready.is_empty() && queued < 2 * conc {
                    let n = self.pipe.ready.len().min(INTENT_CHUNK);
                    let chunk: Vec<PlannedChange> = self.pipe.ready.drain(..n).collect();
                    match store.record_intents(chunk.iter().map(intent_of).collect()) {
                        Ok(id) => {
                            self.pipe.chunks.insert(
                                id,
                                Chunk {
                                    outstanding: chunk.len(),
                                    uncertain: Vec::new(),
                                },
                            );
                            announcing = Some((chunk, id, Box::pin(store.durable())));
                        }
                        Err(e) => {
                            error.get_or_insert(e.into());
                        }
                    }
                }
                // A writer that fell behind holds back new LMS writes (not their answers).
                let behind = writing.is_some()
                    && self.pipe.entries.len() + self.pipe.traces.len() >= MAX_UNWRITTEN;
                while inflight.len() < conc && !behind {
                    let Some((mut c, id)) = self.pipe.armed.pop_front() else {
                        break;
                    };
                    let link = self.pipe.links.remove(&c.entra_id);
                    // Started: a report planned from now on waits for its answer (linked in
                    // flight, it would wait in the target's queue, holding a place here).
                    self.pipe.planned.remove(&c.entra_id);
                    // Held until its index entry is written (or it failed).
                    if !ctx.gate.try_write(&c.entra_id, self.epoch) {
                        if let Err(e) = self.leave_to_worker(c, id) {
                            error.get_or_insert(e.into());
                        }
                        continue;
                    }
                    let link = match link.map(|m| self.link_at_start(&mut c, m)) {
                        Some(Ok(l)) => l,
                        Some(Err(e)) => {
                            error.get_or_insert(e.into());
                            None
                        }
                        None => None,
                    };
                    inflight.push(start(c, id, link));
                }
            }
            let buffered = self.pipe.entries.len() + self.pipe.traces.len();
            // The worker may be waiting for one of these users: no need to fill a batch first.
            if writing.is_none()
                && buffered > 0
                && (buffered >= WRITE_BATCH || inflight.is_empty() || ctx.gate.worker_waiting())
            {
                writing = Some(self.write_applied());
            }
            if feed.is_some() && error.is_some() {
                feed = None;
                self.pipe.listing = false;
            }
            let waiting = self.pipe.ready.len() + self.pipe.armed.len();
            // Many members held for their managers: the next page waits while anything else
            // can move (memory stays bounded), and is read when nothing can.
            let held = self.pipe.waiting_count + self.pipe.parked_count;
            let busy = !inflight.is_empty() || announcing.is_some() || waiting > 0;
            let want_page = feed.is_some()
                && self.pipe.pages.is_empty()
                && waiting < 2 * conc
                && (held < MAX_HELD || !busy);
            // Planning comes last: the changes just started are sent, and answers already in
            // are taken, before the next chunk of members is planned.
            let want_plan = error.is_none() && waiting < 2 * conc && !self.pipe.pages.is_empty();
            let event = tokio::select! {
                biased;
                Some(done) = inflight.next(), if !inflight.is_empty() => Event::Applied(done),
                a = async {
                    match announcing.as_mut() {
                        Some((_, _, f)) => f.await,
                        None => std::future::pending().await,
                    }
                }, if announcing.is_some() => Event::Announced(a),
                w = async {
                    match writing.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if writing.is_some() => Event::Written(w),
                p = async {
                    match probing.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if probing.is_some() => Event::Probed(p),
                item = async {
                    match feed.as_mut() {
                        Some((rx, _)) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                }, if want_page => Event::Feed(item),
                () = std::future::ready(()), if want_plan => Event::Plan,
                else => break,
            };
            match event {
                Event::Applied((c, id, r)) => {
                    if let Err(e) = self.on_applied(c, id, r, counted) {
                        error.get_or_insert(e);
                    }
                }
                Event::Announced(r) => {
                    if let Some((chunk, id, _)) = announcing.take() {
                        match r {
                            Ok(()) => self.pipe.armed.extend(chunk.into_iter().map(|c| (c, id))),
                            // Not sent: the intents stay and are read back next time.
                            Err(e) => {
                                error.get_or_insert(e.into());
                            }
                        }
                    }
                }
                Event::Written(w) => {
                    writing = None;
                    match w {
                        Ok((keys, Ok(()))) => {
                            for k in keys {
                                ctx.gate.release_write(&k);
                                self.pipe.unwritten.remove(&k);
                                let id = self
                                    .pipe
                                    .chunk_of
                                    .get_mut(&k)
                                    .and_then(|v| (!v.is_empty()).then(|| v.remove(0)));
                                if self.pipe.chunk_of.get(&k).is_some_and(Vec::is_empty) {
                                    self.pipe.chunk_of.remove(&k);
                                }
                                if let Some(id) = id {
                                    if let Err(e) = self.chunk_done(id) {
                                        error.get_or_insert(e.into());
                                    }
                                }
                            }
                        }
                        Ok((_, Err(e))) => {
                            error.get_or_insert(e.into());
                        }
                        Err(_) => {
                            error.get_or_insert(RunError::Source(
                                "the index writer thread stopped".into(),
                            ));
                        }
                    }
                }
                Event::Probed(r) => {
                    probing = None;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "the LMS or Graph does not answer; stopping the run");
                        error.get_or_insert(e);
                    }
                }
                Event::Plan => {
                    if let Err(e) = self.plan_some(PLAN_CHUNK) {
                        error.get_or_insert(e);
                    }
                }
                Event::Feed(None) => {
                    feed = None;
                    if let Err(e) = self.unpark_all() {
                        error.get_or_insert(e.into());
                    }
                }
                Event::Feed(Some(item)) => {
                    let active_before = feed.as_ref().map_or(0, |(_, n)| *n);
                    if let Err(e) = item.and_then(|i| self.take_feed(i, active_before)) {
                        error.get_or_insert(e);
                    }
                }
            }
        }
        self.tick(Progress::Applied { done: self.applied });
        if let Some(e) = error {
            return Err(e);
        }
        // Only reachable with a broken wait chain; those members then get the link at the end.
        let stuck: Vec<String> = self.pipe.pending.iter().cloned().collect();
        for id in stuck {
            self.resolve(&id, None)?;
        }
        if !self.pipe.ready.is_empty() || !self.pipe.armed.is_empty() {
            return Box::pin(self.drive(None, counted)).await;
        }
        Ok(())
    }

    /// A create planned to be linked in flight to `manager` is started: when the manager's
    /// create has answered meanwhile, the link goes in its record as planned for a known
    /// manager; while it is still on its way, the target is asked to link the two (returned);
    /// when it was not made, the member is linked at the end of the run.
    fn link_at_start(
        &mut self,
        c: &mut PlannedChange,
        manager: String,
    ) -> Result<Option<String>, StoreError> {
        if let Some(t) = self.manager_target(&manager)? {
            c.record.insert(MANAGER.into(), AttrValue::Str(t));
            return Ok(None);
        }
        Ok(self.pipe.pending.contains(&manager).then_some(manager))
    }

    /// A change of a user the incremental worker holds, or wrote during this run: not sent
    /// (the worker's read is fresher than this run's plan); its intent is settled as not
    /// written, and members waiting for it as their manager are linked at the end.
    pub(super) fn leave_to_worker(
        &mut self,
        c: PlannedChange,
        chunk: IntentId,
    ) -> Result<(), StoreError> {
        tracing::info!(user = %c.entra_id, action = c.action.as_str(), "left to the incremental worker, which changed this user during the run");
        let _ = self.traces.take(&c);
        self.left += 1;
        self.chunk_done(chunk)?;
        self.resolve(&c.entra_id, None)
    }

    /// One change of an intent record is settled (written to the index, or failed): once all
    /// are, the record goes (or keeps only the changes whose outcome is unknown).
    pub(super) fn chunk_done(&mut self, id: IntentId) -> Result<(), StoreError> {
        let Some(chunk) = self.pipe.chunks.get_mut(&id) else {
            return Ok(());
        };
        chunk.outstanding = chunk.outstanding.saturating_sub(1);
        if chunk.outstanding == 0 {
            if let Some(chunk) = self.pipe.chunks.remove(&id) {
                self.ctx.store.settle_intents(id, chunk.uncertain)?;
            }
        }
        Ok(())
    }

    /// Hands the applied changes' index entries and traces to the writer thread, in that
    /// order (a trace relies on its index entry).
    pub(super) fn write_applied(&mut self) -> WriteJob {
        let store = self.ctx.store;
        let writer = self
            .writer
            .get_or_insert_with(|| BackgroundWriter::start(store.clone()));
        let entries = std::mem::replace(&mut self.pipe.entries, Vec::with_capacity(WRITE_BATCH));
        let traces = std::mem::replace(&mut self.pipe.traces, Vec::with_capacity(WRITE_BATCH));
        let job = writer.write(entries, traces);
        self.tick(Progress::Applied { done: self.applied });
        job
    }

    /// Records the LMS's answer to one change (`chunk`: its intent record).
    pub(super) fn on_applied(
        &mut self,
        c: PlannedChange,
        chunk: IntentId,
        r: Result<Applied, ApplyError>,
        counted: bool,
    ) -> Result<(), RunError> {
        match r {
            Ok(applied) => {
                if self.traces.enabled() {
                    let t = self.trace_applied(&c, &applied.matched, counted)?;
                    self.pipe.traces.push(t);
                }
                // What was just applied is what the LMS holds now.
                self.actual.remove(&c.entra_id);
                let target = applied.entry.target_id.clone();
                self.pipe.managers.remove(&c.entra_id);
                if c.action == Action::Deactivate {
                    self.pipe.deactivated.insert(c.entra_id.clone());
                    self.pipe.unwritten.remove(&c.entra_id);
                } else {
                    self.pipe.deactivated.remove(&c.entra_id);
                    self.pipe
                        .unwritten
                        .insert(c.entra_id.clone(), target.clone());
                }
                self.pipe
                    .chunk_of
                    .entry(c.entra_id.clone())
                    .or_default()
                    .push(chunk);
                self.pipe.entries.push((c.entra_id.clone(), applied.entry));
                self.applied += 1;
                self.suspect_streak = 0;
                self.resolve(&c.entra_id, Some(&target))?;
                if counted {
                    self.count(c.action);
                    // A create's diff is its whole record: keep the report small.
                    let changes = if c.action == Action::Create {
                        Vec::new()
                    } else {
                        c.changes
                    };
                    self.report.changes.push(&PlannedChange {
                        record: Record::new(),
                        changes,
                        ..c
                    });
                }
                Ok(())
            }
            Err(ApplyError::User {
                message,
                uncertain,
                suspect,
            }) => {
                self.not_written(&c, chunk, &message, uncertain)?;
                self.probe_due |= suspect;
                if suspect {
                    self.suspect_streak += 1;
                }
                let stop = (suspect && self.suspect_streak >= SUSPECT_STREAK_STOP).then(|| {
                    RunError::Source(format!(
                        "the LMS refused {} writes in a row, the last with: {message}; stopping the run",
                        self.suspect_streak
                    ))
                });
                self.fail_user(&c.entra_id, Some(&c.user_name), message);
                self.resolve(&c.entra_id, None)?;
                match stop {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
            Err(ApplyError::Deferred { message, uncertain }) => {
                tracing::info!(user = %c.entra_id, user_name = %c.user_name, %message, "write deferred to the next run");
                self.not_written(&c, chunk, &message, uncertain)?;
                self.report.counts.deferred += 1;
                self.resolve(&c.entra_id, None)?;
                Ok(())
            }
            Err(ApplyError::Fatal(e)) => Err(e),
        }
    }

    /// A change the LMS did not take (failed or deferred): the gate lets the user go, its
    /// trace says why, and its intent is settled (kept when the write may still have landed).
    pub(super) fn not_written(
        &mut self,
        c: &PlannedChange,
        chunk: IntentId,
        message: &str,
        uncertain: bool,
    ) -> Result<(), StoreError> {
        self.ctx.gate.release_write(&c.entra_id);
        if self.traces.enabled() {
            let mut t = self.traces.take(c);
            t.failed(message, true);
            let t = self.traces.finish(t);
            self.pipe.traces.push(t);
        }
        if uncertain {
            if let Some(ch) = self.pipe.chunks.get_mut(&chunk) {
                ch.uncertain.push(intent_of(c));
            }
        }
        self.chunk_done(chunk)
    }

    pub(super) fn count(&mut self, a: Action) {
        let c = &mut self.report.counts;
        match a {
            Action::Create => c.created += 1,
            Action::Update => c.updated += 1,
            Action::Deactivate => c.deactivated += 1,
            Action::Reactivate => c.reactivated += 1,
        }
    }

    /// Links managers that were not in the target when their reports were planned (created
    /// later in this run), and clears links to managers that are not in the target at all.
    pub(super) async fn settle_managers(
        &mut self,
        users: Vec<(String, Option<String>)>,
    ) -> Result<(), RunError> {
        let mut changes = Vec::new();
        let mut index_only = Vec::new();
        let mut pending_in_dry_run = 0;
        for (id, manager) in users {
            let Some(mut e) = self.indexed(&id)? else {
                // Only in a dry run (or after a failed create) is the user still unindexed.
                pending_in_dry_run += 1;
                continue;
            };
            let want = match &manager {
                Some(m) if self.link_manager => self.manager_target(m)?.map(AttrValue::Str),
                _ => None,
            };
            if e.record.get(MANAGER) == want.as_ref() {
                if e.manager != manager
                    && !self.opts.dry_run
                    && !self.ctx.gate.worker_has(&id, self.epoch)
                {
                    // Nothing to send, but remember who the manager is now.
                    if let Some(mut full) = self.ctx.store.get_user(&id)? {
                        full.manager = manager;
                        index_only.push((id, full));
                    }
                }
                continue;
            }
            e.manager = manager;
            let mut record = e.record.clone();
            match &want {
                Some(v) => record.insert(MANAGER.into(), v.clone()),
                None => record.remove(MANAGER),
            };
            changes.push(PlannedChange {
                action: Action::Update,
                entra_id: id.clone(),
                user_name: e.user_name.clone(),
                target_id: Some(e.target_id.clone()),
                changes: plan::diff(&e.record, &record),
                reason: Some("manager link".into()),
                record,
                manager: e.manager.clone(),
                linked: e.linked,
            });
        }
        if self.opts.dry_run && pending_in_dry_run > 0 {
            self.report.notes.push(format!(
                "{pending_in_dry_run} new users get their manager link at the end of the run, once their manager exists in the LMS"
            ));
        }
        self.ctx.store.put_users(&index_only)?;
        // A user created or updated earlier in this run is not counted a second time.
        let already: HashSet<String> = if changes.is_empty() {
            HashSet::new()
        } else {
            let these: HashSet<&str> = changes.iter().map(|c| c.entra_id.as_str()).collect();
            self.report
                .changes
                .entra_ids()
                .filter(|id| these.contains(id.as_str()))
                .collect()
        };
        let (again, fresh): (Vec<_>, Vec<_>) = changes
            .into_iter()
            .partition(|c| already.contains(c.entra_id.as_str()));
        self.apply_all(again, false).await?;
        let before = self.report.counts.updated;
        self.apply_all(fresh, true).await?;
        // Those were counted as unchanged when first planned.
        let moved = self.report.counts.updated - before;
        self.report.counts.unchanged = self.report.counts.unchanged.saturating_sub(moved);
        Ok(())
    }
}
