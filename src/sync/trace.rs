//! Decision traces: why one user is in the LMS as they are (or not at all).
//!
//! Owns the trace record — when and by what it was decided, scope (which configured group,
//! directly or through which nested group, or why not), how the LMS user was matched, the mapped
//! values, the planned change and the target's answer — its size bounds, and its wording for the
//! terminal. The reconcile, the incremental worker and `sync-user` fill one in where they decide;
//! the store keeps each user's last one (`IntegrationStore::put_traces`). Only decisions that are
//! not "unchanged" are recorded (plus every `sync-user`), so a no-change run writes nothing.
//!
//! Building and rendering are pure; [`explain`] only reads through `IntegrationStore`.

use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::mapping::Record;
use super::plan::{Action, PlannedChange};
use crate::config::IntegrationConfig;
use crate::model::trace::{clip_value, time};
use crate::redact::Redactor;
use crate::store::{IndexEntry, IntegrationStore, StoreError};

pub use crate::model::trace::*;

/// Secrets out of a trace's text (nothing should ever carry one, but an LMS could echo one in
/// an error).
pub(crate) trait Scrub {
    fn scrub(&mut self, redactor: &Redactor) -> &mut Self;
}

impl Scrub for Trace {
    fn scrub(&mut self, redactor: &Redactor) -> &mut Self {
        if redactor.is_empty() {
            return self;
        }
        self.scrub_with(&|s: &mut String| redactor.scrub_in_place(s))
    }
}

/// Traces of one run being decided: each planned change's trace waits here for its answer.
pub(crate) struct Pending {
    integration: String,
    source: Source,
    run: String,
    /// Dry runs keep nothing: their traces are never stored.
    enabled: bool,
    secrets: Redactor,
    /// Traces of planned changes, and whether their mapped values are the change's record
    /// (added when the outcome is known: an applied change's are not copied).
    waiting: HashMap<String, (Trace, bool)>,
}

impl Pending {
    pub(crate) fn new(
        cfg: &IntegrationConfig,
        store: &IntegrationStore,
        source: Source,
        run: &str,
        enabled: bool,
    ) -> Pending {
        Pending {
            integration: cfg.name.to_string(),
            source,
            run: run.to_string(),
            enabled,
            secrets: cfg.redactor(Some(store)),
            waiting: HashMap::new(),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(crate) fn run(&self) -> &str {
        &self.run
    }

    pub(crate) fn start(&self, entra_id: &str) -> Trace {
        Trace::new(&self.integration, self.source, &self.run, entra_id)
    }

    /// Keeps a planned change's trace until [`Pending::take`]. `mapped`: its mapped values
    /// are the planned change's record (added when the outcome is known).
    pub(crate) fn wait(&mut self, t: Trace, mapped: bool) {
        if self.enabled {
            self.waiting.insert(t.entra_id.clone(), (t, mapped));
        }
    }

    /// The trace `c` was planned with (a bare one if none was kept), for an outcome other
    /// than applied.
    pub(crate) fn take(&mut self, c: &PlannedChange) -> Trace {
        let (mut t, mapped) = self.take_raw(c);
        if mapped {
            t.mapped(&c.record);
        }
        t
    }

    /// The trace `c` was planned with, for its applied outcome: its mapped values are the
    /// index entry written with it ([`Trace::mapped_in_index`]).
    pub(crate) fn take_applied(&mut self, c: &PlannedChange) -> Trace {
        let (mut t, mapped) = self.take_raw(c);
        t.mapped_in_index = mapped;
        t
    }

    fn take_raw(&mut self, c: &PlannedChange) -> (Trace, bool) {
        self.waiting.remove(&c.entra_id).unwrap_or_else(|| {
            let mut t = self.start(&c.entra_id);
            t.scope(Scope {
                in_scope: c.action != Action::Deactivate,
                ..Scope::default()
            })
            .plan(c);
            (t, false)
        })
    }

    /// Ready to store: scrubbed.
    pub(crate) fn finish(&self, mut t: Trace) -> Trace {
        t.scrub(&self.secrets);
        t
    }
}

/// What rostersync knows about a user now: the last applied state from the index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexState {
    pub target_id: String,
    pub user_name: String,
    pub active: bool,
    pub linked: bool,
    pub last_applied_at: DateTime<Utc>,
    pub record: Record,
}

impl From<&IndexEntry> for IndexState {
    fn from(e: &IndexEntry) -> Self {
        IndexState {
            target_id: e.target_id.clone(),
            user_name: e.user_name.clone(),
            active: e.active(),
            linked: e.linked,
            last_applied_at: e.updated_at,
            record: e
                .record
                .iter()
                .take(MAX_ITEMS)
                .map(|(k, v)| (k.clone(), clip_value(v)))
                .collect(),
        }
    }
}

/// The answer to "why is this user as they are": the last stored trace and the index entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub integration: String,
    /// What was asked for (object id, UPN or userName).
    pub query: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entra_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexState>,
}

impl Explanation {
    pub fn known(&self) -> bool {
        self.trace.is_some() || self.index.is_some()
    }
}

/// Looks a user up by object id, UPN or userName and returns what the store knows. Makes no
/// Graph or LMS call.
pub fn explain(store: &IntegrationStore, key: &str) -> Result<Explanation, StoreError> {
    let entra_id = store.resolve_user(key)?;
    let (trace, index) = match &entra_id {
        Some(id) => (store.trace(id)?, store.get_user(id)?),
        None => (None, None),
    };
    Ok(Explanation {
        integration: store.name().to_string(),
        query: key.to_string(),
        entra_id,
        trace,
        index: index.as_ref().map(IndexState::from),
    })
}

/// `explain` for the terminal.
pub fn render_explanation(e: &Explanation) -> String {
    let mut s = String::new();
    if !e.known() {
        let _ = writeln!(
            s,
            "{}: nothing is known about {:?}: no decision was recorded for it and it is not in the user index (not an object id, UPN or userName rostersync has synced). `sync-user` asks Entra now.",
            e.integration, e.query
        );
        return s;
    }
    let id = e.entra_id.as_deref().unwrap_or("?");
    let name = e
        .index
        .as_ref()
        .map(|i| i.user_name.as_str())
        .or_else(|| e.trace.as_ref().and_then(|t| t.user_name.as_deref()))
        .unwrap_or(&e.query);
    let _ = writeln!(s, "{}: {name} (Entra id {id})", e.integration);
    match &e.index {
        Some(i) => {
            let _ = writeln!(
                s,
                "  now        {} in the LMS, LMS user id {}, userName {:?}{}; last applied {}",
                if i.active { "active" } else { "inactive" },
                i.target_id,
                i.user_name,
                if i.linked { " (adopted)" } else { "" },
                time(&i.last_applied_at)
            );
        }
        None => {
            let _ = writeln!(s, "  now        not in the LMS (not in the user index)");
        }
    }
    match &e.trace {
        Some(t) => {
            let _ = writeln!(s, "  why        {}", t.summary());
            let _ = writeln!(
                s,
                "  since      no change since {} (every change and failure is recorded; unchanged runs are not)",
                time(&t.at)
            );
            let _ = writeln!(s, "  last decision:");
            for line in t.render().lines().skip(1) {
                let _ = writeln!(s, "  {line}");
            }
        }
        None => {
            let _ = writeln!(
                s,
                "  why        no decision recorded (synced before decision traces were kept, and unchanged since); `sync-user` traces it now"
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::trace::render_scope;
    use crate::sync::mapping::{AttrChange, AttrValue, ACTIVE, EXTERNAL_ID, MANAGER, USER_NAME};
    use crate::text::clip;

    fn s(v: &str) -> AttrValue {
        AttrValue::Str(v.into())
    }

    fn change(action: Action, target: Option<&str>) -> PlannedChange {
        let mut record = Record::new();
        record.insert(USER_NAME.into(), s("ada@x"));
        record.insert(EXTERNAL_ID.into(), s("u1"));
        record.insert(ACTIVE.into(), AttrValue::Bool(action != Action::Deactivate));
        record.insert("title".into(), s("Engineer"));
        PlannedChange {
            action,
            entra_id: "u1".into(),
            user_name: "ada@x".into(),
            target_id: target.map(str::to_string),
            changes: vec![AttrChange {
                key: "title".into(),
                old: Some(s("Intern")),
                new: Some(s("Engineer")),
            }],
            reason: None,
            record,
            manager: None,
            linked: false,
        }
    }

    fn direct() -> Via {
        Via {
            group_id: "g1".into(),
            group_name: Some("All Employees".into()),
            path: Path::Direct,
        }
    }

    #[test]
    fn long_values_and_long_lists_are_cut() {
        assert_eq!(clip("abc", 3), "abc");
        let long = "x".repeat(1000);
        let c = clip(&long, MAX_VALUE_CHARS);
        assert_eq!(c.chars().count(), MAX_VALUE_CHARS);
        assert!(c.ends_with('…'));
        assert_eq!(clip("ÅÅÅÅ", 3), "ÅÅ…", "cut on characters, not bytes");

        let mut record = Record::new();
        for i in 0..100 {
            record.insert(format!("custom.a{i:03}"), s(&long));
        }
        let mut c = change(Action::Update, Some("t1"));
        c.changes = (0..100)
            .map(|i| AttrChange {
                key: format!("custom.a{i:03}"),
                old: None,
                new: Some(s(&long)),
            })
            .collect();
        let mut t = Trace::new("x", Source::Reconcile, "r1", "u1");
        t.mapped(&record).plan(&c).failed(&long.repeat(3), true);
        let m = t.mapped.as_ref().unwrap();
        assert_eq!((m.len(), t.mapped_omitted), (MAX_ITEMS, 100 - MAX_ITEMS));
        assert!(m
            .values()
            .all(|v| matches!(v, AttrValue::Str(s) if s.chars().count() == MAX_VALUE_CHARS)));
        let p = t.plan.as_ref().unwrap();
        assert_eq!((p.changes.len(), p.omitted), (MAX_ITEMS, 100 - MAX_ITEMS));
        match &t.answer {
            Some(Answer::Error { message }) => {
                assert_eq!(message.chars().count(), MAX_TEXT_CHARS)
            }
            other => panic!("{other:?}"),
        }
        // The stored form stays small.
        let bytes = serde_json::to_vec(&t).unwrap();
        assert!(bytes.len() < 64 * 1024, "{}", bytes.len());
    }

    #[test]
    fn a_create_renders_scope_match_mapping_plan_and_answer() {
        let c = change(Action::Create, None);
        let mut t = Trace::new("test", Source::SyncUser, "sync-user", "u1");
        t.user(None, Some("ada@x"))
            .scope(Scope::of(None, vec![direct()]))
            .mapped(&c.record)
            .plan(&c)
            .applied(
                &c,
                &Match::Created {
                    target_id: "t9".into(),
                },
            );
        let out = t.render();
        for want in [
            "test: ada@x (Entra id u1)",
            "in scope: direct member of \"All Employees\" (g1)",
            "not in the index → created LMS user t9",
            "title = \"Engineer\"",
            "plan       create",
            "answer     ok, LMS user id t9",
            "outcome    created",
        ] {
            assert!(out.contains(want), "{want:?} missing in:\n{out}");
        }
        assert!(t.summary().starts_with("created in the LMS"));
        // Round trip through the stored form.
        let back: Trace = serde_json::from_slice(&serde_json::to_vec(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn scope_wording_covers_nested_and_every_reason_to_be_out() {
        let nested = Via {
            path: Path::Nested {
                group_id: "g2".into(),
                group_name: Some("Contractors".into()),
            },
            ..direct()
        };
        assert_eq!(
            render_scope(&Scope::of(None, vec![nested])),
            "in scope: member of \"All Employees\" (g1) through nested group \"Contractors\" (g2)"
        );
        let disabled = render_scope(&Scope::of(Some(OutOfScope::Disabled), vec![direct()]));
        assert!(
            disabled.contains("accountEnabled = false")
                && disabled.contains("; groups: direct member of"),
            "{disabled}"
        );
        assert!(
            render_scope(&Scope::of(Some(OutOfScope::LeftAllGroups), vec![]))
                .contains("left all groups")
        );
        assert!(render_scope(&Scope::of(Some(OutOfScope::Deleted), vec![])).contains("deleted"));

        let mut t = Trace::new("test", Source::Reconcile, "r1", "u1");
        let c = change(Action::Deactivate, Some("t1"));
        t.scope(Scope::of(Some(OutOfScope::Disabled), vec![direct()]))
            .plan(&c)
            .applied(
                &c,
                &Match::Index {
                    target_id: "t1".into(),
                },
            );
        let sum = t.summary();
        assert!(
            sum.starts_with("inactive since") && sum.contains("accountEnabled = false"),
            "{sum}"
        );
        assert!(sum.contains("by reconcile r1"), "{sum}");
    }

    #[test]
    fn secrets_are_scrubbed_from_every_text() {
        let secret = "s3cr3t-token-value".to_string();
        let c = change(Action::Update, Some("t1"));
        let mut t = Trace::new("x", Source::Incremental, "incremental", "u1");
        t.plan(&c)
            .failed(&format!("PATCH answered 400: bad token {secret}"), true);
        t.note = Some(format!("note {secret}"));
        let mut r = Redactor::default();
        r.add(&secrecy::SecretString::from(secret.clone()));
        t.scrub(&r);
        let json = serde_json::to_string(&t).unwrap();
        assert!(
            !json.contains(&secret) && json.contains("[redacted]"),
            "{json}"
        );
    }

    #[test]
    fn a_later_manager_link_amends_the_runs_trace() {
        let c = change(Action::Create, None);
        let mut t = Trace::new("x", Source::Reconcile, "r1", "u1");
        t.mapped(&c.record).plan(&c);
        let link = PlannedChange {
            action: Action::Update,
            changes: vec![AttrChange {
                key: MANAGER.into(),
                old: None,
                new: Some(s("t-boss")),
            }],
            ..change(Action::Update, Some("t1"))
        };
        t.amend(&link, "manager link");
        let p = t.plan.as_ref().unwrap();
        assert_eq!(p.action, Action::Create);
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.reason.as_deref(), Some("manager link"));
        assert_eq!(t.mapped.as_ref().unwrap()[MANAGER], s("t-boss"));
    }

    #[test]
    fn an_unknown_user_is_said_to_be_unknown() {
        let e = Explanation {
            integration: "test".into(),
            query: "nobody@x".into(),
            entra_id: None,
            trace: None,
            index: None,
        };
        let out = render_explanation(&e);
        assert!(out.contains("nothing is known about \"nobody@x\""), "{out}");
    }
}
