//! The feed: every group's members read page by page on a task of their own.

use super::*;

/// The configured group a member was listed in, as a trace's scope.
pub(super) fn listed_in(g: &GraphGroup) -> Via {
    Via {
        group_id: g.id.clone(),
        group_name: (!g.display_name.is_empty()).then(|| g.display_name.clone()),
        path: trace::Path::Transitive,
    }
}

/// Aborts the member reader task when the run ends early.
pub(super) struct AbortOnDrop(pub(super) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(super) type FeedRx = tokio::sync::mpsc::Receiver<Result<Feed, RunError>>;

/// A member as mapped, with its index entry (record cut down to the managed keys).
pub(super) type Mapped = (Desired, Option<IndexEntry>);

/// The user's index entry with its record cut down to the managed keys; in a deep run, with
/// what the LMS really holds (`actual`: `None` when the LMS user was deleted by hand).
pub(super) fn lookup(
    store: &IntegrationStore,
    actual: &HashMap<String, Option<Record>>,
    managed: &BTreeSet<String>,
    entra_id: &str,
) -> Result<Option<IndexEntry>, StoreError> {
    Ok(cut(store.get_user(entra_id)?, actual, managed, entra_id))
}

/// [`lookup`] of an entry already read.
pub(super) fn cut(
    entry: Option<IndexEntry>,
    actual: &HashMap<String, Option<Record>>,
    managed: &BTreeSet<String>,
    entra_id: &str,
) -> Option<IndexEntry> {
    let mut e = entry?;
    match actual.get(entra_id) {
        Some(None) => return None,
        Some(Some(r)) => e.record = r.clone(),
        None => {}
    }
    e.record.retain(|k, _| managed.contains(k));
    Some(e)
}

/// What the Graph reader hands to the planner.
pub(super) enum Feed {
    /// Members not seen before in this run, with their managers.
    Page {
        /// Each user with its mapping (done by the reader, on its own task, so mapping the
        /// next page overlaps with applying this one).
        users: Vec<(GraphUser, Result<Mapped, MapFailure>)>,
        malformed: Vec<String>,
        /// The configured group being listed (for the decision traces).
        group: GraphGroup,
    },
    /// A group was listed completely.
    GroupDone { group: GraphGroup, count: u64 },
}

/// Reads every group's members page by page (and their managers) into `tx`. Returns the ids
/// of all members seen once every group was listed completely; on an error it sends the error
/// and returns it too.
/// What the member reader reads and how it maps what it read.
pub(super) struct FeedSpec {
    pub(super) groups: Vec<String>,
    pub(super) user_select: Vec<String>,
    pub(super) manager_select: Option<Vec<String>>,
    pub(super) concurrency: usize,
    pub(super) mapping: Mapping,
    /// Attributes the target accepts; others are dropped from mapped records.
    pub(super) managed: BTreeSet<String>,
    /// Each mapped member's index entry is read by the reader too, off the planner's task.
    pub(super) store: IntegrationStore,
    /// Deep runs: what the LMS really holds where it differs from the index.
    pub(super) actual: HashMap<String, Option<Record>>,
    /// How managers are learnt (with `manager_select`).
    pub(super) managers: Option<crate::sync::managers::Mode>,
    /// The index held nobody when the run started: members are not looked up in it.
    pub(super) index_empty: bool,
}

pub(super) async fn feed_members(
    graph: Arc<GraphClient>,
    spec: FeedSpec,
    tx: tokio::sync::mpsc::Sender<Result<Feed, RunError>>,
) -> Result<HashSet<String>, RunError> {
    let FeedSpec {
        groups,
        user_select,
        manager_select,
        concurrency,
        mapping,
        managed,
        store,
        actual,
        managers: manager_mode,
        index_empty,
    } = spec;
    let mut seen: HashSet<String> = HashSet::new();
    // Managers read or looked up in this run (a manager has many reports).
    let mut memo = HashMap::new();
    let result: Result<bool, RunError> = async {
        for group_id in &groups {
            let group = graph.group(group_id).await?;
            let span = tracing::info_span!("group", group = %group.id, name = %group.display_name);
            let mut count = 0u64;
            let mut pages = 0u64;
            let mut next = Some(graph.transitive_users_url(group_id, &user_select));
            while let Some(url) = next.take() {
                let mut page = graph.user_page(&url).instrument(span.clone()).await?;
                pages += 1;
                // A peer that repeats a nextLink or never ends must not hold the run forever
                // (10 million members at 100 a page).
                if page.next.as_deref() == Some(url.as_str()) || pages > 100_000 {
                    return Err(RunError::Source(format!(
                        "Graph paging of group {group_id} does not end (page {pages} links to itself or the listing is implausibly long)"
                    )));
                }
                next = page.next.take();
                count += page.users.len() as u64;
                if page.lacks_properties() {
                    return Err(RunError::Source(
                        "Graph returns members without properties (no userPrincipalName): the app lacks User.Read.All; grant it and have an administrator consent".into(),
                    ));
                }
                let users: Vec<GraphUser> = page.users.into_iter().filter(|u| seen.insert(u.id.clone())).collect();
                let entries = if index_empty {
                    vec![None; users.len()]
                } else {
                    users
                        .iter()
                        .map(|u| store.get_user(&u.id))
                        .collect::<Result<Vec<_>, _>>()?
                };
                let managers = match (&manager_select, &manager_mode) {
                    (Some(sel), Some(mode)) => {
                        let from = crate::sync::managers::Lookup { graph: &graph, store: &store, mode, select: sel, concurrency };
                        from.page(&users, &entries, &mut memo).instrument(span.clone()).await?
                    }
                    _ => HashMap::new(),
                };
                let mut mapped = Vec::with_capacity(users.len());
                for (u, entry) in users.into_iter().zip(entries) {
                    let mgr = managers.get(&u.id).and_then(|m| m.as_ref());
                    let d = match mapping.apply(&u, mgr) {
                        Ok(mut d) => {
                            d.record.retain(|k, _| managed.contains(k));
                            let existing = cut(entry, &actual, &managed, &u.id);
                            Ok((d, existing))
                        }
                        Err(f) => Err(f),
                    };
                    mapped.push((u, d));
                }
                let users = mapped;
                let msg = Feed::Page {
                    users,
                    malformed: page.malformed,
                    group: group.clone(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(false);
                }
            }
            if tx.send(Ok(Feed::GroupDone { group, count })).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
    .await;
    match result {
        Ok(true) => Ok(seen),
        Ok(false) => Err(RunError::Source("the member listing was abandoned".into())),
        Err(e) => {
            let msg = e.to_string();
            let _ = tx.send(Err(e)).await;
            Err(RunError::Source(msg))
        }
    }
}
