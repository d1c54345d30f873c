//! The SCIM dialect of one LMS: what its SCIM server really accepts and keeps.
//!
//! Owns: the description (PATCH ops, clearing, PUT, filterable attributes, userName case rule,
//! what the server keeps), how it is resolved from four layers (config pins > what the server
//! taught us > discovery documents > defaults), and the pure rules that turn one refused write
//! into one downgrade. It does no I/O: `lms::scim` sends, reads and persists.
//!
//! Defaults follow what partial servers take: single-valued attributes are set with `replace`
//! (RFC 7644 §3.5.2.3 lets it add an absent attribute), multi-valued ones are replaced as a
//! whole list, and `remove` is used only to clear.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A PATCH operation (RFC 7644 §3.5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchOp {
    Add,
    Replace,
    Remove,
}

impl PatchOp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PatchOp::Add => "add",
            PatchOp::Replace => "replace",
            PatchOp::Remove => "remove",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<PatchOp> {
        match s {
            "add" => Some(PatchOp::Add),
            "replace" => Some(PatchOp::Replace),
            "remove" => Some(PatchOp::Remove),
            _ => None,
        }
    }
}

/// How a single-valued attribute is cleared with PATCH.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clear {
    /// `{"op": "remove", "path": …}`.
    Remove,
    /// `{"op": "replace", "path": …, "value": null}`.
    Null,
    /// `{"op": "replace", "path": …, "value": ""}`.
    Empty,
    /// PATCH cannot clear: PUT the resource without the attribute when PUT works, else the
    /// value stays (one warning per user and field per run).
    None,
}

impl Clear {
    pub(crate) fn parse(s: &str) -> Option<Clear> {
        match s {
            "remove" => Some(Clear::Remove),
            "null" => Some(Clear::Null),
            "empty" => Some(Clear::Empty),
            "none" => Some(Clear::None),
            _ => None,
        }
    }
    /// The next form to try once this one was refused.
    fn next(self) -> Clear {
        match self {
            Clear::Remove => Clear::Null,
            Clear::Null => Clear::Empty,
            Clear::Empty | Clear::None => Clear::None,
        }
    }
}

/// An attribute rostersync looks users up by (`filter=<attr> eq "…"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FilterAttr {
    #[serde(rename = "userName")]
    UserName,
    #[serde(rename = "externalId")]
    ExternalId,
}

impl FilterAttr {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FilterAttr::UserName => "userName",
            FilterAttr::ExternalId => "externalId",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<FilterAttr> {
        match s {
            "userName" => Some(FilterAttr::UserName),
            "externalId" => Some(FilterAttr::ExternalId),
            _ => None,
        }
    }
}

/// How the server compares userNames when it enforces their uniqueness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaseRule {
    /// `caseExact: false` (RFC 7643 §4.1.1): `Ada@x` and `ada@x` are the same user.
    CaseInsensitive,
    /// The server lets `Ada@x` and `ada@x` coexist: rostersync checks case-insensitively
    /// itself before creating.
    CaseSensitive,
}

impl CaseRule {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CaseRule::CaseInsensitive => "case-insensitive",
            CaseRule::CaseSensitive => "case-sensitive",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<CaseRule> {
        match s {
            "case-insensitive" => Some(CaseRule::CaseInsensitive),
            "case-sensitive" => Some(CaseRule::CaseSensitive),
            _ => None,
        }
    }
}

/// One layer of the dialect: every field optional (unset = the layer below decides). Used for
/// the config pins, what was learned from the server (stored) and what discovery says.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DialectSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_ops: Option<BTreeSet<PatchOp>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub put: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_paths: Option<bool>,
    /// Whether `replace` sets an attribute that has no value yet (RFC 7644 §3.5.2.3 says it
    /// does); otherwise `add` is used for those.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace_adds: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear: Option<Clear>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<BTreeSet<FilterAttr>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_name_unique: Option<CaseRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_type: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enterprise: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom: Option<bool>,
    /// Record keys the server refuses to PATCH (written with PUT instead).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub no_patch: BTreeSet<String>,
    /// Record keys that can be neither set nor changed after the create.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub not_writable: BTreeSet<String>,
    /// Record keys that can never be cleared.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub no_clear: BTreeSet<String>,
    /// Record keys no PATCH form clears (while others are): cleared with GET + PUT.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub clear_by_put: BTreeSet<String>,
    /// Record keys the server does not keep as sent (computed or normalised): sent when they
    /// change in Entra, never "repaired" by `reconcile --deep`.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub not_kept: BTreeSet<String>,
}

/// Where a field of the effective dialect comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Default,
    Discovered,
    Learned,
    Config,
}

impl Origin {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::Discovered => "discovery",
            Origin::Learned => "learned",
            Origin::Config => "config",
        }
    }
}

/// The dialect in force: every field decided.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Dialect {
    /// PATCH ops the server takes; empty = no PATCH at all (every change is GET + PUT).
    pub patch_ops: BTreeSet<PatchOp>,
    /// Whether `PUT /Users/{id}` works (the fallback where PATCH cannot do something).
    pub put: bool,
    /// Whether value-path filters (`emails[type eq "work"].value`) may be used in PATCH paths.
    /// Off by default: typed lists are replaced as a whole.
    pub value_paths: bool,
    /// Whether `replace` sets an absent attribute (else `add` does).
    pub replace_adds: bool,
    pub clear: Clear,
    pub filter: BTreeSet<FilterAttr>,
    pub user_name_unique: CaseRule,
    /// Whether the server keeps `emails[].type` (otherwise the untyped primary or sole e-mail
    /// is read as the work e-mail).
    pub email_type: bool,
    /// Pinned: send the enterprise / custom extension (or not) whatever discovery says.
    pub enterprise: Option<bool>,
    pub custom: Option<bool>,
    pub no_patch: BTreeSet<String>,
    pub not_writable: BTreeSet<String>,
    pub no_clear: BTreeSet<String>,
    pub clear_by_put: BTreeSet<String>,
    pub not_kept: BTreeSet<String>,
    /// Where each field comes from (`patch_ops` → `learned`, …).
    pub origin: BTreeMap<String, Origin>,
}

impl Default for Dialect {
    fn default() -> Self {
        Dialect::resolve(
            &DialectSettings::default(),
            &DialectSettings::default(),
            &DialectSettings::default(),
        )
    }
}

fn default_ops() -> BTreeSet<PatchOp> {
    [PatchOp::Add, PatchOp::Replace, PatchOp::Remove].into()
}

fn all_filters() -> BTreeSet<FilterAttr> {
    [FilterAttr::UserName, FilterAttr::ExternalId].into()
}

impl Dialect {
    /// Pins beat what was learned, which beats discovery, which beats the defaults. The key
    /// sets are unions of the layers.
    pub(crate) fn resolve(
        discovered: &DialectSettings,
        learned: &DialectSettings,
        pinned: &DialectSettings,
    ) -> Dialect {
        let mut origin = BTreeMap::new();
        fn pick<T: Clone>(
            origin: &mut BTreeMap<String, Origin>,
            name: &str,
            layers: [Option<&T>; 3],
            default: T,
        ) -> T {
            let found = [Origin::Config, Origin::Learned, Origin::Discovered]
                .into_iter()
                .zip(layers)
                .find_map(|(o, v)| v.map(|v| (o, v.clone())));
            let (o, v) = found.unwrap_or((Origin::Default, default));
            origin.insert(name.to_string(), o);
            v
        }
        let layers = [pinned, learned, discovered];
        macro_rules! field {
            ($f:ident, $default:expr) => {
                pick(
                    &mut origin,
                    stringify!($f),
                    layers.map(|l| l.$f.as_ref()),
                    $default,
                )
            };
        }
        let patch_ops = field!(patch_ops, default_ops());
        let put = field!(put, true);
        let value_paths = field!(value_paths, false);
        let replace_adds = field!(replace_adds, true);
        let clear = field!(clear, Clear::Remove);
        let filter = field!(filter, all_filters());
        let user_name_unique = field!(user_name_unique, CaseRule::CaseInsensitive);
        let email_type = field!(email_type, true);
        let enterprise = layers.iter().find_map(|l| l.enterprise);
        let custom = layers.iter().find_map(|l| l.custom);
        let union = |f: fn(&DialectSettings) -> &BTreeSet<String>| -> BTreeSet<String> {
            layers.iter().flat_map(|l| f(l).iter().cloned()).collect()
        };
        let mut d = Dialect {
            patch_ops,
            put,
            value_paths,
            replace_adds,
            clear,
            filter,
            user_name_unique,
            email_type,
            enterprise,
            custom,
            no_patch: union(|l| &l.no_patch),
            not_writable: union(|l| &l.not_writable),
            no_clear: union(|l| &l.no_clear),
            clear_by_put: union(|l| &l.clear_by_put),
            not_kept: union(|l| &l.not_kept),
            origin,
        };
        // `remove` cannot clear on a server that does not take it.
        if d.clear == Clear::Remove && !d.patch_ops.contains(&PatchOp::Remove) {
            d.clear = Clear::Null;
        }
        d
    }

    /// Whether PATCH can be used at all.
    pub(crate) fn patch(&self) -> bool {
        self.patch_ops.contains(&PatchOp::Replace) || self.patch_ops.contains(&PatchOp::Add)
    }

    /// The op that sets a value: `replace` (it adds an absent attribute too), else `add`.
    pub(crate) fn set_op(&self) -> Option<PatchOp> {
        self.set_op_for(false)
    }

    /// The op that sets a value that is absent now (`absent`) or present.
    pub(crate) fn set_op_for(&self, absent: bool) -> Option<PatchOp> {
        if absent && !self.replace_adds && self.patch_ops.contains(&PatchOp::Add) {
            return Some(PatchOp::Add);
        }
        if self.patch_ops.contains(&PatchOp::Replace) {
            Some(PatchOp::Replace)
        } else if self.patch_ops.contains(&PatchOp::Add) {
            Some(PatchOp::Add)
        } else {
            None
        }
    }

    pub(crate) fn filters(&self, attr: FilterAttr) -> bool {
        self.filter.contains(&attr)
    }

    /// One line per field, with where it comes from (for `check` and `/status`).
    pub(crate) fn summary(&self) -> Vec<String> {
        self.lines().into_iter().map(|(l, _)| l).collect()
    }

    /// The lines of [`Dialect::summary`] that differ from the defaults.
    pub(crate) fn notable(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|(_, o)| *o != Origin::Default)
            .map(|(l, _)| l)
            .collect()
    }

    fn lines(&self) -> Vec<(String, Origin)> {
        let o = |f: &str| self.origin.get(f).copied().unwrap_or(Origin::Default);
        let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
        let ops: Vec<&str> = self.patch_ops.iter().map(|p| p.as_str()).collect();
        let filters: Vec<&str> = self.filter.iter().map(|f| f.as_str()).collect();
        let line = |text: String, field: &str| {
            let origin = o(field);
            (format!("{text} ({})", origin.as_str()), origin)
        };
        let mut out = vec![
            line(
                format!(
                    "PATCH ops: {}",
                    if ops.is_empty() {
                        "none: every change is GET + PUT".to_string()
                    } else {
                        ops.join(", ")
                    }
                ),
                "patch_ops",
            ),
            line(
                format!("PUT: {}", if self.put { "yes" } else { "no" }),
                "put",
            ),
            line(
                format!(
                    "clear a value with: {}",
                    match self.clear {
                        Clear::Remove => "remove",
                        Clear::Null => "replace null",
                        Clear::Empty => "replace \"\"",
                        Clear::None if self.put => "PUT without it",
                        Clear::None => "nothing works",
                    }
                ),
                "clear",
            ),
            line(
                format!(
                    "value-path filters in PATCH: {}",
                    if self.value_paths {
                        "yes"
                    } else {
                        "no: typed lists are replaced whole"
                    }
                ),
                "value_paths",
            ),
            line(
                format!(
                    "look users up by: {}",
                    if filters.is_empty() {
                        "nothing: one paged listing of /Users per run, matched here".to_string()
                    } else {
                        format!("filter on {}", filters.join(", "))
                    }
                ),
                "filter",
            ),
            line(
                format!(
                    "set an absent value with: {}",
                    if self.replace_adds { "replace" } else { "add" }
                ),
                "replace_adds",
            ),
            line(
                format!("userName uniqueness: {}", self.user_name_unique.as_str()),
                "user_name_unique",
            ),
            line(
                format!(
                    "emails[].type kept: {}",
                    if self.email_type { "yes" } else { "no" }
                ),
                "email_type",
            ),
        ];
        for (name, set) in [
            ("PATCH refused for", &self.no_patch),
            ("cannot be changed after the create", &self.not_writable),
            ("can never be cleared", &self.no_clear),
            ("cleared with GET + PUT", &self.clear_by_put),
            (
                "not kept by the LMS as sent (not repaired by --deep)",
                &self.not_kept,
            ),
        ] {
            if !set.is_empty() {
                out.push((format!("{name}: {}", list(set)), Origin::Learned));
            }
        }
        out
    }
}

/// One thing learned about the server, with the answer that taught it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Downgrade {
    /// The PATCH op is not supported (`add` or `remove`).
    NoPatchOp {
        op: PatchOp,
    },
    /// PATCH is not supported at all: changes are GET + PUT.
    NoPatch,
    NoPut,
    NoValuePaths,
    /// `replace` of an absent attribute was refused (noTarget): absent values are set with
    /// `add`.
    ReplaceAddsNothing,
    /// The clearing form in force was refused: use `to` from now on.
    Clear {
        to: Clear,
    },
    NoFilter {
        attr: FilterAttr,
    },
    CaseSensitive,
    EmailTypeDropped,
    NoPatchFor {
        key: String,
    },
    NotWritable {
        key: String,
    },
    NoClearFor {
        key: String,
    },
    NotKept {
        key: String,
    },
}

impl Downgrade {
    /// Folds this lesson into the learned layer; false when it teaches nothing new.
    pub(crate) fn apply(&self, learned: &mut DialectSettings, now: &Dialect) -> bool {
        match self {
            Downgrade::NoPatchOp { op } => {
                let mut ops = now.patch_ops.clone();
                let changed = ops.remove(op);
                learned.patch_ops = Some(ops);
                if *op == PatchOp::Remove && now.clear == Clear::Remove {
                    learned.clear = Some(Clear::Null);
                }
                changed
            }
            Downgrade::NoPatch => {
                let changed = !now.patch_ops.is_empty();
                learned.patch_ops = Some(BTreeSet::new());
                changed
            }
            Downgrade::NoPut => {
                learned.put = Some(false);
                now.put
            }
            Downgrade::NoValuePaths => {
                learned.value_paths = Some(false);
                now.value_paths
            }
            Downgrade::ReplaceAddsNothing => {
                learned.replace_adds = Some(false);
                now.replace_adds
            }
            Downgrade::Clear { to } => {
                learned.clear = Some(*to);
                now.clear != *to
            }
            Downgrade::NoFilter { attr } => {
                let mut f = now.filter.clone();
                let changed = f.remove(attr);
                learned.filter = Some(f);
                changed
            }
            Downgrade::CaseSensitive => {
                learned.user_name_unique = Some(CaseRule::CaseSensitive);
                now.user_name_unique != CaseRule::CaseSensitive
            }
            Downgrade::EmailTypeDropped => {
                learned.email_type = Some(false);
                learned.value_paths = Some(false);
                now.email_type
            }
            Downgrade::NoPatchFor { key } => {
                learned.no_patch.insert(key.clone()) && !now.no_patch.contains(key)
            }
            Downgrade::NotWritable { key } => {
                learned.not_writable.insert(key.clone()) && !now.not_writable.contains(key)
            }
            Downgrade::NoClearFor { key } => {
                learned.no_clear.insert(key.clone()) && !now.no_clear.contains(key)
            }
            Downgrade::NotKept { key } => {
                learned.not_kept.insert(key.clone()) && !now.not_kept.contains(key)
            }
        }
    }

    /// Whether a config pin forbids learning this.
    pub(crate) fn pinned_against(&self, pins: &DialectSettings) -> bool {
        match self {
            // Pinning remove as the way to clear (or add for absent values) pins that op too.
            Downgrade::NoPatchOp {
                op: PatchOp::Remove,
            } => pins.patch_ops.is_some() || pins.clear == Some(Clear::Remove),
            Downgrade::NoPatchOp { op: PatchOp::Add } => {
                pins.patch_ops.is_some() || pins.replace_adds == Some(false)
            }
            Downgrade::NoPatchOp { .. } | Downgrade::NoPatch => pins.patch_ops.is_some(),
            Downgrade::NoPut => pins.put.is_some(),
            Downgrade::NoValuePaths => pins.value_paths.is_some(),
            Downgrade::ReplaceAddsNothing => pins.replace_adds.is_some(),
            Downgrade::Clear { .. } => pins.clear.is_some(),
            Downgrade::NoFilter { .. } => pins.filter.is_some(),
            Downgrade::CaseSensitive => pins.user_name_unique.is_some(),
            Downgrade::EmailTypeDropped => pins.email_type.is_some(),
            Downgrade::NoPatchFor { .. }
            | Downgrade::NotWritable { .. }
            | Downgrade::NoClearFor { .. }
            | Downgrade::NotKept { .. } => false,
        }
    }

    /// What rostersync does from now on, in words.
    pub(crate) fn consequence(&self) -> String {
        match self {
            Downgrade::NoPatchOp { op } => {
                format!("PATCH \"{}\" is not supported: not sent any more", op.as_str())
            }
            Downgrade::NoPatch => "PATCH is not supported: changes are made with GET + PUT".into(),
            Downgrade::NoPut => "PUT is not supported: not used as a fallback".into(),
            Downgrade::NoValuePaths => {
                "value-path filters are not supported: typed lists are replaced whole".into()
            }
            Downgrade::ReplaceAddsNothing => {
                "replace does not set an absent attribute: absent values are set with add".into()
            }
            Downgrade::Clear { to: Clear::None } => {
                "PATCH cannot clear a value: cleared by PUT where PUT works, else left as it is"
                    .into()
            }
            Downgrade::Clear { to } => format!(
                "values are cleared with {}",
                match to {
                    Clear::Remove => "remove",
                    Clear::Null => "replace null",
                    _ => "replace \"\"",
                }
            ),
            Downgrade::NoFilter { attr } => format!(
                "users cannot be found with a filter on {}: the index, other filters or a listing of /Users are used",
                attr.as_str()
            ),
            Downgrade::CaseSensitive => {
                "userNames are unique case-sensitively: checked case-insensitively before creating"
                    .into()
            }
            Downgrade::EmailTypeDropped => {
                "emails[].type is not kept: the primary or sole e-mail is the work e-mail".into()
            }
            Downgrade::NoPatchFor { key } => {
                format!("{key} cannot be PATCHed: written with PUT where PUT works")
            }
            Downgrade::NotWritable { key } => {
                format!("{key} cannot be changed after the create: left as it is (warned)")
            }
            Downgrade::NoClearFor { key } => {
                format!("{key} can never be cleared: left as it is (warned)")
            }
            Downgrade::NotKept { key } => format!(
                "{key} is not kept by the LMS as sent: sent when it changes, not repaired by --deep"
            ),
        }
    }
}

impl fmt::Display for Downgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.consequence())
    }
}

/// A lesson as stored: when, what, and the answer that taught it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lesson {
    pub at: DateTime<Utc>,
    pub downgrade: Downgrade,
    pub evidence: String,
}

/// What the server taught rostersync, as kept in the store (meta `scim_dialect`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Learned {
    pub settings: DialectSettings,
    /// The most recent lessons, oldest first (at most [`MAX_LESSONS`]).
    pub lessons: Vec<Lesson>,
    /// When `check --probe` last replaced the whole layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probed_at: Option<DateTime<Utc>>,
}

pub(crate) const MAX_LESSONS: usize = 50;

impl Learned {
    pub(crate) fn record(&mut self, downgrade: Downgrade, evidence: String) {
        self.lessons.push(Lesson {
            at: Utc::now(),
            downgrade,
            evidence,
        });
        if self.lessons.len() > MAX_LESSONS {
            let extra = self.lessons.len() - MAX_LESSONS;
            self.lessons.drain(..extra);
        }
    }
}

/// What a PATCH operation did, for blaming it when the server refuses the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// Sets a single-valued attribute.
    Set,
    /// Sets a single-valued attribute that has no value yet.
    SetAbsent,
    /// Replaces a whole multi-valued list (typed e-mails or phone numbers).
    WholeList,
    /// Sets a whole multi-valued list that has no value yet.
    WholeListAbsent,
    /// Sets one typed element through a value-path filter.
    ValuePath,
    /// Clears with the given form.
    Clear(Clear),
}

/// The learnable part of a refused request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refusal<'a> {
    pub status: u16,
    pub scim_type: Option<&'a str>,
}

impl Refusal<'_> {
    /// 501 / 405: the server does not implement what was asked.
    fn unsupported(&self) -> bool {
        matches!(self.status, 501 | 405)
    }
    fn scim(&self, t: &str) -> bool {
        self.scim_type.is_some_and(|s| s.eq_ignore_ascii_case(t))
    }
    /// The 400s that speak about the path or the attribute rather than the value.
    fn about_path(&self) -> bool {
        self.status == 400 && (self.scim("invalidPath") || self.scim("noTarget"))
    }
    fn mutability(&self) -> bool {
        self.status == 400 && self.scim("mutability")
    }
    /// A 400 that may be about the value (`invalidValue`, or no scimType at all).
    fn about_value(&self) -> bool {
        self.status == 400 && (self.scim_type.is_none() || self.scim("invalidValue"))
    }
}

/// The downgrade one refused PATCH op teaches, if any. `keys` are the record keys it wrote.
/// Only forms that have an equivalent fallback are downgraded on a plain 400: a refused
/// `replace` of a value is a real error unless the server says it is about the path or the
/// attribute's mutability.
pub(crate) fn learn_patch(
    op: PatchOp,
    form: &Form,
    keys: &[String],
    r: Refusal<'_>,
) -> Vec<Downgrade> {
    let per_key = |f: fn(String) -> Downgrade| keys.iter().cloned().map(f).collect::<Vec<_>>();
    if form == &Form::ValuePath && (r.unsupported() || r.status == 400) {
        return vec![Downgrade::NoValuePaths];
    }
    match (op, form) {
        (PatchOp::Add, _) if r.unsupported() || r.status == 400 => {
            vec![Downgrade::NoPatchOp { op: PatchOp::Add }]
        }
        (PatchOp::Remove, _) if r.unsupported() => {
            vec![Downgrade::NoPatchOp {
                op: PatchOp::Remove,
            }]
        }
        (_, Form::Clear(_)) if r.mutability() => per_key(|key| Downgrade::NoClearFor { key }),
        (PatchOp::Remove, _) if r.about_path() || r.about_value() => {
            vec![Downgrade::NoPatchOp {
                op: PatchOp::Remove,
            }]
        }
        (_, Form::Clear(c)) if r.about_path() || r.about_value() || r.unsupported() => {
            vec![Downgrade::Clear { to: c.next() }]
        }
        (PatchOp::Replace, _) if r.unsupported() => vec![Downgrade::NoPatch],
        (PatchOp::Replace, Form::SetAbsent | Form::WholeListAbsent)
            if r.status == 400 && r.scim("noTarget") =>
        {
            vec![Downgrade::ReplaceAddsNothing]
        }
        (_, Form::Set | Form::SetAbsent | Form::WholeList) if r.about_path() || r.mutability() => {
            per_key(|key| Downgrade::NoPatchFor { key })
        }
        _ => Vec::new(),
    }
}

/// The downgrade a refused PUT of `keys` teaches (`clearing`: the PUT dropped them).
pub(crate) fn learn_put(keys: &[String], clearing: bool, r: Refusal<'_>) -> Vec<Downgrade> {
    if r.unsupported() {
        return vec![Downgrade::NoPut];
    }
    if keys.len() == 1 && (r.about_path() || r.mutability()) {
        let key = keys[0].clone();
        return vec![if clearing {
            Downgrade::NoClearFor { key }
        } else {
            Downgrade::NotWritable { key }
        }];
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(status: u16, t: Option<&str>) -> Refusal<'_> {
        Refusal {
            status,
            scim_type: t,
        }
    }

    #[test]
    fn layers_resolve_config_over_learned_over_discovery_over_default() {
        let d = Dialect::default();
        assert_eq!(d.set_op(), Some(PatchOp::Replace));
        assert_eq!(d.clear, Clear::Remove);
        assert!(!d.value_paths && d.put && d.filters(FilterAttr::ExternalId));
        let discovered = DialectSettings {
            filter: Some(BTreeSet::new()),
            patch_ops: Some(BTreeSet::new()),
            ..Default::default()
        };
        let learned = DialectSettings {
            filter: Some([FilterAttr::UserName].into()),
            not_kept: ["displayName".to_string()].into(),
            ..Default::default()
        };
        let pinned = DialectSettings {
            patch_ops: Some([PatchOp::Replace].into()),
            not_kept: ["title".to_string()].into(),
            ..Default::default()
        };
        let d = Dialect::resolve(&discovered, &learned, &pinned);
        assert_eq!(d.patch_ops, [PatchOp::Replace].into());
        assert_eq!(d.origin["patch_ops"], Origin::Config);
        assert_eq!(d.filter, [FilterAttr::UserName].into());
        assert_eq!(d.origin["filter"], Origin::Learned);
        assert_eq!(d.origin["put"], Origin::Default);
        assert_eq!(
            d.clear,
            Clear::Null,
            "remove cannot clear where remove is not taken"
        );
        assert_eq!(d.not_kept.len(), 2);
    }

    #[test]
    fn a_refused_op_teaches_one_downgrade_and_plain_value_errors_teach_nothing() {
        let keys = ["title".to_string()];
        let set = learn_patch(PatchOp::Replace, &Form::Set, &keys, r(400, None));
        assert!(set.is_empty(), "a bad value is not a missing capability");
        assert_eq!(
            learn_patch(
                PatchOp::Replace,
                &Form::Set,
                &keys,
                r(400, Some("mutability"))
            ),
            vec![Downgrade::NoPatchFor {
                key: "title".into()
            }]
        );
        assert_eq!(
            learn_patch(
                PatchOp::Remove,
                &Form::Clear(Clear::Remove),
                &keys,
                r(501, None)
            ),
            vec![Downgrade::NoPatchOp {
                op: PatchOp::Remove
            }]
        );
        assert_eq!(
            learn_patch(
                PatchOp::Replace,
                &Form::Clear(Clear::Null),
                &keys,
                r(400, Some("invalidValue"))
            ),
            vec![Downgrade::Clear { to: Clear::Empty }]
        );
        assert_eq!(
            learn_patch(
                PatchOp::Replace,
                &Form::Clear(Clear::Empty),
                &keys,
                r(400, None)
            ),
            vec![Downgrade::Clear { to: Clear::None }]
        );
        assert_eq!(
            learn_patch(PatchOp::Replace, &Form::Set, &keys, r(501, None)),
            vec![Downgrade::NoPatch]
        );
        assert_eq!(
            learn_patch(
                PatchOp::Replace,
                &Form::SetAbsent,
                &keys,
                r(400, Some("noTarget"))
            ),
            vec![Downgrade::ReplaceAddsNothing]
        );
        assert_eq!(
            learn_patch(
                PatchOp::Replace,
                &Form::ValuePath,
                &keys,
                r(400, Some("noTarget"))
            ),
            vec![Downgrade::NoValuePaths]
        );
        assert_eq!(
            learn_put(&keys, false, r(501, None)),
            vec![Downgrade::NoPut]
        );
        assert_eq!(
            learn_put(&keys, true, r(400, Some("mutability"))),
            vec![Downgrade::NoClearFor {
                key: "title".into()
            }]
        );
        assert!(learn_put(&keys, false, r(400, Some("invalidValue"))).is_empty());
    }

    #[test]
    fn downgrades_are_monotone_so_learning_ends() {
        let mut learned = DialectSettings::default();
        let mut d = Dialect::default();
        let ladder = [
            Downgrade::NoPatchOp {
                op: PatchOp::Remove,
            },
            Downgrade::Clear { to: Clear::Empty },
            Downgrade::Clear { to: Clear::None },
            Downgrade::NoPut,
        ];
        for step in &ladder {
            assert!(step.apply(&mut learned, &d), "{step:?} is new");
            d = Dialect::resolve(&DialectSettings::default(), &learned, &Default::default());
            assert!(
                !step.apply(&mut learned, &d),
                "{step:?} again teaches nothing"
            );
        }
        assert_eq!(d.clear, Clear::None);
        assert!(!d.put);
        let pins = DialectSettings {
            put: Some(true),
            ..Default::default()
        };
        assert!(Downgrade::NoPut.pinned_against(&pins));
        let text = serde_json::to_string(&learned).unwrap();
        let back: DialectSettings = serde_json::from_str(&text).unwrap();
        assert_eq!(back, learned);
    }
}
