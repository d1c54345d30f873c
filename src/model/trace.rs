//! Decision traces: why one user is in the LMS as they are (or not at all). The record and its
//! wording for the terminal; `sync::trace` fills them in where the sync decides and reads them
//! back for `explain`.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::change::{Action, PlannedChange};
use super::record::{AttrChange, AttrValue, Record};
use crate::text::clip;

/// Longest string value kept in a trace (longer ones end in `…`).
pub(crate) const MAX_VALUE_CHARS: usize = 256;
/// Longest reason or error text kept in a trace.
pub(crate) const MAX_TEXT_CHARS: usize = 1024;
/// Most mapped values, attribute changes or groups kept in a trace.
pub(crate) const MAX_ITEMS: usize = 64;

/// What made the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Reconcile,
    Incremental,
    SyncUser,
}

impl Source {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Source::Reconcile => "reconcile",
            Source::Incremental => "incremental",
            Source::SyncUser => "sync-user",
        }
    }
}

/// How a user belongs to a configured group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Path {
    /// A direct member of the configured group.
    Direct,
    /// A member through this group, nested (at some depth) in the configured group.
    Nested {
        group_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_name: Option<String>,
    },
    /// Listed among the configured group's transitive members (a full reconcile reads them
    /// flattened, so it does not know whether directly).
    Transitive,
}

/// One configured group that puts the user in scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Via {
    pub group_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
    pub path: Path,
}

/// Why a user is not (or no longer) in scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutOfScope {
    /// Was synced, and is no longer a member of any configured group (a full reconcile cannot
    /// tell this from a deletion: both are "not listed").
    LeftAllGroups,
    /// A member, but the account is disabled.
    Disabled,
    /// Deleted (or soft-deleted) in Entra.
    Deleted,
    /// Not a member of any configured group, and never synced.
    NotMember,
}

impl OutOfScope {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            OutOfScope::LeftAllGroups => {
                "left all groups: no longer a member of any configured group (removed, or deleted in Entra)"
            }
            OutOfScope::Disabled => "disabled in Entra (accountEnabled = false)",
            OutOfScope::Deleted => "deleted in Entra (or soft-deleted)",
            OutOfScope::NotMember => "not a member of any configured group",
        }
    }
}

/// Scope: whether the user should be active in the LMS, and through which groups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    pub in_scope: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<OutOfScope>,
    /// The configured groups the user is a member of (also for a disabled member).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<Via>,
}

impl Scope {
    /// An enabled member (`out` = None) or not, through `via`.
    pub(crate) fn of(out: Option<OutOfScope>, mut via: Vec<Via>) -> Scope {
        via.truncate(MAX_ITEMS);
        for v in &mut via {
            v.group_name = v.group_name.take().map(|n| clip(&n, MAX_VALUE_CHARS));
            if let Path::Nested { group_name, .. } = &mut v.path {
                *group_name = group_name.take().map(|n| clip(&n, MAX_VALUE_CHARS));
            }
        }
        Scope {
            in_scope: out.is_none(),
            out,
            via,
        }
    }
}

/// How the LMS user was found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Match {
    /// Not in the index and nothing applied: a create is (or would be) the plan.
    #[default]
    None,
    /// In the user index: rostersync created or linked this LMS user before.
    Index { target_id: String },
    /// The create answered 409 and the LMS user with this userName was taken over: one that
    /// already had the user's externalId, or (`adopted`) one without any, by `link_existing`.
    UserName { target_id: String, adopted: bool },
    /// The create answered 409 and the LMS user with the user's externalId was found.
    ExternalId { target_id: String },
    /// A new LMS user was created.
    Created { target_id: String },
}

/// What was decided for the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Created,
    /// An existing LMS user was taken over instead of creating one.
    Linked,
    Updated,
    Deactivated,
    Reactivated,
    /// Nothing to change (only `sync-user` records this).
    Unchanged,
    /// A disabled member that was never in the LMS: not created.
    Skipped,
    /// A dry run: planned, not applied.
    Planned,
    Failed,
    /// A deactivation the mass-deactivation guard held back.
    Held,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Linked => "linked",
            Outcome::Updated => "updated",
            Outcome::Deactivated => "deactivated",
            Outcome::Reactivated => "reactivated",
            Outcome::Unchanged => "unchanged",
            Outcome::Skipped => "skipped",
            Outcome::Planned => "planned (dry run)",
            Outcome::Failed => "failed",
            Outcome::Held => "held by the guard",
        }
    }
}

/// The planned change, as planned (a create lists every attribute under `mapped` instead).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TracePlan {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<AttrChange>,
    /// Changes left out beyond [`MAX_ITEMS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: usize,
}

/// What the LMS answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Answer {
    Ok {
        target_id: String,
    },
    /// The error as the LMS gave it (status, SCIM type and detail), or why rostersync would not
    /// proceed after what the LMS answered (e.g. the userName belongs to another identity).
    Error {
        message: String,
    },
}

/// One user's decision, as stored and as `sync-user` / `explain` print it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub at: DateTime<Utc>,
    pub integration: String,
    pub source: Source,
    /// The reconcile's run id, or "incremental" / "sync-user".
    pub run: String,
    #[serde(default)]
    pub dry_run: bool,
    pub entra_id: String,
    /// The LMS userName, as mapped (or as indexed when the user could not be mapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upn: Option<String>,
    pub scope: Scope,
    pub matched: Match,
    /// What the mapping produced (the attributes rostersync manages), when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped: Option<Record>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mapped_omitted: usize,
    /// Set instead of `mapped` on an applied change's trace on its way to the store: the
    /// mapped values are the record of the index entry written with it, which the store reads
    /// them back from (`store::traces`), so they are not copied here only to be dropped.
    #[serde(skip)]
    pub mapped_in_index: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<TracePlan>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
    /// Why it failed, was held or skipped, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

pub(crate) fn clip_value(v: &AttrValue) -> AttrValue {
    match v {
        AttrValue::Str(s) => AttrValue::Str(clip(s, MAX_VALUE_CHARS)),
        b => b.clone(),
    }
}

fn clip_change(c: &AttrChange) -> AttrChange {
    AttrChange {
        key: clip(&c.key, MAX_VALUE_CHARS),
        old: c.old.as_ref().map(clip_value),
        new: c.new.as_ref().map(clip_value),
    }
}

impl Trace {
    /// A trace of `entra_id` decided now; the rest is filled in as the decision is made.
    pub(crate) fn new(integration: &str, source: Source, run: &str, entra_id: &str) -> Trace {
        Trace {
            at: Utc::now(),
            integration: integration.to_string(),
            source,
            run: run.to_string(),
            dry_run: false,
            entra_id: entra_id.to_string(),
            user_name: None,
            upn: None,
            scope: Scope::default(),
            matched: Match::None,
            mapped: None,
            mapped_omitted: 0,
            mapped_in_index: false,
            plan: None,
            outcome: Outcome::Unchanged,
            answer: None,
            note: None,
        }
    }

    pub(crate) fn user(&mut self, user_name: Option<&str>, upn: Option<&str>) -> &mut Self {
        if let Some(n) = user_name {
            self.user_name = Some(clip(n, MAX_VALUE_CHARS));
        }
        if let Some(u) = upn {
            self.upn = Some(clip(u, MAX_VALUE_CHARS));
        }
        self
    }

    pub(crate) fn scope(&mut self, scope: Scope) -> &mut Self {
        self.scope = scope;
        self
    }

    /// The mapped record (bounded).
    pub(crate) fn mapped(&mut self, record: &Record) -> &mut Self {
        self.mapped_omitted = record.len().saturating_sub(MAX_ITEMS);
        self.mapped = Some(
            record
                .iter()
                .take(MAX_ITEMS)
                .map(|(k, v)| (clip(k, MAX_VALUE_CHARS), clip_value(v)))
                .collect(),
        );
        self
    }

    /// The planned change; the match follows from it (indexed, or none → create).
    pub(crate) fn plan(&mut self, c: &PlannedChange) -> &mut Self {
        self.user(Some(&c.user_name), None);
        self.matched = match &c.target_id {
            Some(id) => Match::Index {
                target_id: clip(id, MAX_VALUE_CHARS),
            },
            None => Match::None,
        };
        // A create's diff is its whole record, already under `mapped`.
        let changes: &[AttrChange] = if c.action == Action::Create {
            &[]
        } else {
            &c.changes
        };
        self.plan = Some(TracePlan {
            action: c.action,
            reason: c.reason.as_deref().map(|r| clip(r, MAX_TEXT_CHARS)),
            changes: changes.iter().take(MAX_ITEMS).map(clip_change).collect(),
            omitted: changes.len().saturating_sub(MAX_ITEMS),
        });
        self.outcome = Outcome::Planned;
        self
    }

    /// The LMS took the change: `matched` is how the user was found when it was applied.
    pub(crate) fn applied(&mut self, c: &PlannedChange, matched: &Match) -> &mut Self {
        if self.plan.is_none() {
            self.plan(c);
        }
        self.matched = matched.clone();
        let target_id = match matched {
            Match::Index { target_id }
            | Match::UserName { target_id, .. }
            | Match::ExternalId { target_id }
            | Match::Created { target_id } => target_id.clone(),
            Match::None => c.target_id.clone().unwrap_or_default(),
        };
        self.outcome = match (c.action, matched) {
            (Action::Create, Match::UserName { .. } | Match::ExternalId { .. }) => Outcome::Linked,
            (Action::Create, _) => Outcome::Created,
            (Action::Update, _) => Outcome::Updated,
            (Action::Deactivate, _) => Outcome::Deactivated,
            (Action::Reactivate, _) => Outcome::Reactivated,
        };
        self.answer = Some(Answer::Ok {
            target_id: clip(&target_id, MAX_VALUE_CHARS),
        });
        self
    }

    /// The user failed: `from_target` when the message is the LMS's answer to the change.
    pub(crate) fn failed(&mut self, message: &str, from_target: bool) -> &mut Self {
        self.outcome = Outcome::Failed;
        let message = clip(message, MAX_TEXT_CHARS);
        if from_target {
            self.answer = Some(Answer::Error { message });
        } else {
            self.note = Some(message);
        }
        self
    }

    pub(crate) fn held(&mut self, why: &str) -> &mut Self {
        self.outcome = Outcome::Held;
        self.note = Some(clip(why, MAX_TEXT_CHARS));
        self
    }

    pub(crate) fn skipped(&mut self, why: &str) -> &mut Self {
        self.outcome = Outcome::Skipped;
        self.note = Some(clip(why, MAX_TEXT_CHARS));
        self
    }

    /// A change applied later in the same run (the manager link, once the manager exists) is
    /// added to this run's trace instead of replacing it.
    pub(crate) fn amend(&mut self, c: &PlannedChange, reason: &str) -> &mut Self {
        let Some(plan) = self.plan.as_mut() else {
            return self.plan(c);
        };
        for ch in &c.changes {
            plan.changes.retain(|x| x.key != ch.key);
            if plan.changes.len() < MAX_ITEMS {
                plan.changes.push(clip_change(ch));
            } else {
                plan.omitted += 1;
            }
        }
        let r = match plan.reason.take() {
            Some(r) => format!("{r}; {reason}"),
            None => reason.to_string(),
        };
        plan.reason = Some(clip(&r, MAX_TEXT_CHARS));
        if let Some(m) = self.mapped.as_mut() {
            for ch in &c.changes {
                match &ch.new {
                    Some(v) => m.insert(ch.key.clone(), clip_value(v)),
                    None => m.remove(&ch.key),
                };
            }
        }
        self
    }

    /// Applies `fix` to every text of the trace (`sync::trace::Scrub` replaces the secrets with
    /// it); nothing should ever carry one, but an LMS could echo one in an error.
    pub(crate) fn scrub_with(&mut self, fix: &dyn Fn(&mut String)) -> &mut Self {
        let fix_value = |v: &mut AttrValue| {
            if let AttrValue::Str(s) = v {
                fix(s);
            }
        };
        for s in [&mut self.user_name, &mut self.upn, &mut self.note]
            .into_iter()
            .flatten()
        {
            fix(s);
        }
        if let Some(Answer::Error { message }) = self.answer.as_mut() {
            fix(message);
        }
        if let Some(m) = self.mapped.as_mut() {
            m.values_mut().for_each(fix_value);
        }
        if let Some(p) = self.plan.as_mut() {
            if let Some(r) = p.reason.as_mut() {
                fix(r);
            }
            for c in &mut p.changes {
                c.old.iter_mut().chain(c.new.iter_mut()).for_each(fix_value);
            }
        }
        self
    }

    /// The decision in one line, e.g. `deactivated 2026-11-28T07:00:00Z by reconcile …: disabled
    /// in Entra (accountEnabled = false)`.
    pub fn summary(&self) -> String {
        let when = format!("{} by {}", time(&self.at), self.by());
        let why = self
            .scope
            .out
            .map(|o| o.describe().to_string())
            .or_else(|| self.plan.as_ref().and_then(|p| p.reason.clone()));
        match self.outcome {
            Outcome::Deactivated => format!(
                "inactive since {when}: {}",
                why.unwrap_or_else(|| "deactivated".into())
            ),
            Outcome::Reactivated => format!(
                "reactivated {when}: {}",
                why.unwrap_or_else(|| "member again and enabled".into())
            ),
            Outcome::Created => format!("created in the LMS {when}"),
            Outcome::Linked => format!("linked to an existing LMS user {when}"),
            Outcome::Updated => {
                let keys: Vec<&str> = self
                    .plan
                    .iter()
                    .flat_map(|p| p.changes.iter().map(|c| c.key.as_str()))
                    .collect();
                format!("updated {when}: {}", keys.join(", "))
            }
            Outcome::Unchanged => format!("checked {when}: nothing to change"),
            Outcome::Skipped => format!(
                "not in the LMS (since {when}): {}",
                self.note.as_deref().unwrap_or("skipped")
            ),
            Outcome::Planned => format!(
                "dry run {when}: would {}",
                self.plan
                    .as_ref()
                    .map_or("change nothing", |p| p.action.as_str())
            ),
            Outcome::Failed => {
                let why = match &self.answer {
                    Some(Answer::Error { message }) => message.as_str(),
                    _ => self.note.as_deref().unwrap_or("failed"),
                };
                format!("failed {when}: {why}")
            }
            Outcome::Held => format!(
                "deactivation held {when} by the mass-deactivation guard: {}",
                self.note.as_deref().unwrap_or("")
            ),
        }
    }

    fn by(&self) -> String {
        match self.source {
            Source::Reconcile => format!("reconcile {}", self.run),
            s => s.as_str().to_string(),
        }
    }

    /// The whole trace for the terminal, several indented lines.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let who = self
            .user_name
            .as_deref()
            .or(self.upn.as_deref())
            .unwrap_or("?");
        let _ = writeln!(
            s,
            "{}: {} (Entra id {})",
            self.integration, who, self.entra_id
        );
        if let Some(upn) = self
            .upn
            .as_deref()
            .filter(|u| Some(*u) != self.user_name.as_deref())
        {
            let _ = writeln!(s, "  upn        {upn}");
        }
        let dry = if self.dry_run { " (dry run)" } else { "" };
        let _ = writeln!(s, "  decided    {} by {}{dry}", time(&self.at), self.by());
        let _ = writeln!(s, "  scope      {}", render_scope(&self.scope));
        let _ = writeln!(
            s,
            "  match      {}",
            render_match(&self.matched, self.plan.as_ref())
        );
        match &self.mapped {
            Some(m) if !m.is_empty() => {
                let mut first = true;
                for (k, v) in m {
                    let label = if first { "mapped" } else { "" };
                    first = false;
                    let _ = writeln!(s, "  {label:<10} {k} = {v}");
                }
                if self.mapped_omitted > 0 {
                    let _ = writeln!(s, "             … {} more", self.mapped_omitted);
                }
            }
            _ => {
                let _ = writeln!(s, "  mapped     (not mapped)");
            }
        }
        match &self.plan {
            Some(p) => {
                let reason = p
                    .reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                let detail = if p.action == Action::Create {
                    " (every mapped attribute)".to_string()
                } else {
                    String::new()
                };
                let _ = writeln!(s, "  plan       {}{detail}{reason}", p.action.as_str());
                for c in &p.changes {
                    let _ = writeln!(
                        s,
                        "             {}: {} → {}",
                        c.key,
                        opt(&c.old),
                        opt(&c.new)
                    );
                }
                if p.omitted > 0 {
                    let _ = writeln!(s, "             … {} more", p.omitted);
                }
            }
            None => {
                let _ = writeln!(s, "  plan       no change");
            }
        }
        let answer = match &self.answer {
            Some(Answer::Ok { target_id }) => format!("ok, LMS user id {target_id}"),
            Some(Answer::Error { message }) => format!("error: {message}"),
            None if self.dry_run => "nothing sent (dry run)".into(),
            None => "nothing sent".into(),
        };
        let _ = writeln!(s, "  answer     {answer}");
        let _ = writeln!(s, "  outcome    {}", self.outcome.as_str());
        if let Some(n) = &self.note {
            let _ = writeln!(s, "  note       {n}");
        }
        s
    }
}

pub(crate) fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn opt(v: &Option<AttrValue>) -> String {
    v.as_ref().map_or("(none)".into(), |v| v.to_string())
}

fn group(id: &str, name: Option<&str>) -> String {
    match name {
        Some(n) if !n.is_empty() => format!("{n:?} ({id})"),
        _ => format!("group {id}"),
    }
}

fn render_via(v: &Via) -> String {
    let g = group(&v.group_id, v.group_name.as_deref());
    match &v.path {
        Path::Direct => format!("direct member of {g}"),
        Path::Nested {
            group_id,
            group_name,
        } => format!(
            "member of {g} through nested group {}",
            group(group_id, group_name.as_deref())
        ),
        Path::Transitive => format!("listed among the members of {g} (direct or nested)"),
    }
}

pub(crate) fn render_scope(s: &Scope) -> String {
    let via = s.via.iter().map(render_via).collect::<Vec<_>>().join("; ");
    match (s.out, via.is_empty()) {
        (None, true) if s.in_scope => "in scope".into(),
        (None, true) => "not in scope".into(),
        (None, false) => format!("in scope: {via}"),
        (Some(o), true) => format!("not in scope: {}", o.describe()),
        (Some(o), false) => format!("not in scope: {}; groups: {via}", o.describe()),
    }
}

fn render_match(m: &Match, plan: Option<&TracePlan>) -> String {
    match m {
        Match::None if plan.is_some_and(|p| p.action == Action::Create) => {
            "not in the index → create".into()
        }
        Match::None => "not in the index".into(),
        Match::Index { target_id } => format!("by the index (LMS user {target_id})"),
        Match::Created { target_id } => {
            format!("not in the index → created LMS user {target_id}")
        }
        Match::UserName {
            target_id,
            adopted: true,
        } => format!(
            "the create answered 409: by userName, LMS user {target_id} (no externalId) adopted (link_existing)"
        ),
        Match::UserName { target_id, .. } => format!(
            "the create answered 409: by userName, LMS user {target_id} already carries this externalId"
        ),
        Match::ExternalId { target_id } => {
            format!("the create answered 409: by externalId, LMS user {target_id}")
        }
    }
}
