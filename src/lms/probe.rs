//! `check --probe`: proves against the real LMS, with canary users, every SCIM operation the
//! mapping and the lifecycle need, and learns the LMS's dialect from the answers.
//!
//! The canaries have reserved userNames, `rostersync-probe-<random>@invalid.example` (the
//! `.invalid` top-level domain can never be a real address, RFC 2606), so they cannot collide
//! with a person. The probe creates the canary with every mapped attribute, looks it up by
//! userName and externalId, changes and clears each attribute, sets and clears the manager,
//! sets `active` false and true, creates a second canary "by hand" (no externalId) and adopts
//! it by userName as rostersync adopts existing users, tries a case variant of the userName,
//! the `add` op and PUT, and at the end deactivates every canary (deleted only with
//! `--probe-delete`, where the LMS supports DELETE). What it learned replaces the stored
//! dialect layer; pins in config still win.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::dialect::{CaseRule, Clear, DialectSettings, Downgrade, FilterAttr, Learned, PatchOp};
use super::scim::{ext_value, get_ci, scalar, typed_element, Place, ScimTarget, PATCH_OP};
use super::{Target, TargetError};
use crate::model::record::{AttrValue, Record, ACTIVE, EXTERNAL_ID, MANAGER, USER_NAME};
use crate::text::clip;

/// What to prove.
#[derive(Clone, Debug)]
pub(crate) struct ProbeSpec {
    /// Mapped record keys the LMS is sent (not userName, externalId, active or the manager).
    pub keys: Vec<String>,
    /// Whether the manager link is part of the mapping.
    pub manager: bool,
    /// Delete the canaries at the end (only where the LMS supports DELETE).
    pub delete: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowStatus {
    /// Works as rostersync needs.
    Ok,
    /// rostersync works around it, or a field cannot be changed or cleared at all (said in
    /// `action`; a warning per user and run when it happens).
    Warn,
    /// Something the lifecycle needs cannot be done: creating, reading or deactivating users,
    /// or telling an existing userName (409).
    Fail,
}

/// One line of the probe's table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRow {
    pub operation: String,
    /// What the LMS answered (status, scimType, detail).
    pub answer: String,
    /// What rostersync will do about it.
    pub action: String,
    pub status: RowStatus,
}

/// The probe's result, as printed, stored (meta `scim_probe`) and shown on `/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub at: DateTime<Utc>,
    /// userName of the main canary.
    pub canary: String,
    pub rows: Vec<ProbeRow>,
    /// The dialect in force after the probe (one line per field, with its origin).
    pub dialect: Vec<String>,
}

impl ProbeReport {
    pub fn failed(&self) -> bool {
        self.rows.iter().any(|r| r.status == RowStatus::Fail)
    }
}

/// One answer of the LMS.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    scim_type: Option<String>,
    detail: String,
    body: Option<Value>,
    /// The `Location` header (a create's id where the body has none).
    location: Option<String>,
}

impl Answer {
    /// What PATCH would answer where the probe already found it missing.
    fn no_patch() -> Answer {
        Answer {
            status: 501,
            scim_type: None,
            detail: "PATCH is not supported".into(),
            body: None,
            location: None,
        }
    }

    /// The id of a created user: from the body, else from `Location`.
    fn created_id(&self) -> Option<String> {
        if !self.ok() {
            return None;
        }
        self.body
            .as_ref()
            .and_then(|b| get_ci(b, "id"))
            .and_then(|i| match i {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|s| !s.is_empty())
            .or_else(|| {
                self.location
                    .as_deref()
                    .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            })
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    /// Status and scimType only.
    fn short(&self) -> String {
        match &self.scim_type {
            Some(t) => format!("{} {t}", self.status),
            None => self.status.to_string(),
        }
    }
    fn text(&self) -> String {
        let mut s = self.status.to_string();
        if let Some(t) = &self.scim_type {
            s.push(' ');
            s.push_str(t);
        }
        if !self.ok() && !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&clip(&self.detail, 100));
        }
        s
    }
}

/// A probe value for a record key (`n` = 1 for the create, 2 for the change).
fn value_for(key: &str, n: u32, tag: &str) -> String {
    match key {
        k if k.starts_with("emails.") => format!("rostersync-probe-{tag}+{n}@invalid.example"),
        k if k.starts_with("phoneNumbers.") => format!("+1 555 0100 00{n}"),
        "preferredLanguage" | "locale" => ["en-GB", "fr-FR"][(n as usize - 1) % 2].into(),
        "timezone" => ["Europe/London", "Europe/Paris"][(n as usize - 1) % 2].into(),
        "profileUrl" => format!("https://invalid.example/rostersync-probe/{n}"),
        _ => format!("rostersync probe {n}"),
    }
}

struct Probe<'a> {
    t: &'a ScimTarget,
    rows: Vec<ProbeRow>,
    learned: DialectSettings,
    lessons: Learned,
    /// Canaries made (LMS ids), deactivated at the end.
    canaries: Vec<String>,
}

impl Probe<'_> {
    fn row(
        &mut self,
        operation: impl Into<String>,
        answer: impl Into<String>,
        action: impl Into<String>,
        status: RowStatus,
    ) {
        self.rows.push(ProbeRow {
            operation: operation.into(),
            answer: answer.into(),
            action: action.into(),
            status,
        });
    }

    fn lesson(&mut self, d: Downgrade, evidence: String) {
        self.lessons.record(d, evidence);
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, TargetError> {
        let m = match method {
            reqwest::Method::GET => "GET",
            reqwest::Method::POST => "POST",
            reqwest::Method::PUT => "PUT",
            reqwest::Method::PATCH => "PATCH",
            _ => "DELETE",
        };
        let (status, location, bytes) = self.t.send(method, path, body, m != "POST").await?;
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        let (scim_type, detail) = match self.t.error(m, path, status, &bytes) {
            TargetError::Http {
                scim_type, detail, ..
            } => (scim_type, detail),
            _ => (None, String::new()),
        };
        Ok(Answer {
            status,
            scim_type,
            detail,
            body,
            location,
        })
    }

    fn user_path(id: &str) -> String {
        format!("/Users/{}", crate::text::urlencode(id))
    }

    async fn patch(&self, id: &str, op: Value) -> Result<Answer, TargetError> {
        let body = json!({"schemas": [PATCH_OP], "Operations": [op]});
        self.call(reqwest::Method::PATCH, &Self::user_path(id), Some(&body))
            .await
    }

    /// The user as the LMS holds it now, in the record vocabulary.
    async fn read(&self, id: &str) -> Result<Option<Record>, TargetError> {
        Ok(self.t.get(id).await?.map(|u| u.record))
    }

    async fn find(&self, attr: FilterAttr, value: &str) -> Result<(Answer, usize), TargetError> {
        let literal = serde_json::to_string(value).unwrap_or_default();
        let filter = format!("{} eq {literal}", attr.as_str());
        let path = format!("/Users?filter={}", crate::text::urlencode(&filter));
        let a = self.call(reqwest::Method::GET, &path, None).await?;
        let n = a
            .body
            .as_ref()
            .and_then(|b| get_ci(b, "Resources"))
            .and_then(|r| r.as_array())
            .map(|r| {
                r.iter()
                    .filter(|u| {
                        get_ci(u, attr.as_str())
                            .and_then(|v| v.as_str())
                            .is_some_and(|v| v.eq_ignore_ascii_case(value))
                    })
                    .count()
            })
            .unwrap_or(0);
        Ok((a, n))
    }

    /// GET + PUT with one key set (or dropped).
    async fn put(
        &self,
        id: &str,
        key: &str,
        value: Option<&AttrValue>,
    ) -> Result<Answer, TargetError> {
        let path = Self::user_path(id);
        let got = self.call(reqwest::Method::GET, &path, None).await?;
        if got.status != 200 {
            return Ok(got);
        }
        let Some(current) = got.body else {
            return Ok(got);
        };
        let change = crate::model::record::AttrChange {
            key: key.to_string(),
            old: None,
            new: value.cloned(),
        };
        let next = super::scim::write::apply_to_resource(
            &current,
            std::slice::from_ref(&change),
            &|k| self.t.place(k),
            true,
        );
        self.call(reqwest::Method::PUT, &path, Some(&next)).await
    }

    /// The path and value that set `key` with PATCH (a typed list is replaced whole).
    fn set_op(&self, op: PatchOp, key: &str, v: &AttrValue) -> Value {
        match self.t.place(key) {
            Place::Core(k) => json!({"op": op.as_str(), "path": k, "value": scalar(v)}),
            Place::Typed(attr, ty) => {
                json!({"op": op.as_str(), "path": attr, "value": [typed_element(ty, scalar(v))]})
            }
            Place::Ext(urn, a) => {
                json!({"op": op.as_str(), "path": format!("{urn}:{a}"), "value": ext_value(a, scalar(v))})
            }
        }
    }

    /// The PATCH ops that clear `key`, in the order rostersync tries them.
    fn clear_ops(&self, key: &str) -> Vec<(Clear, Value)> {
        let (path, list, complex) = match self.t.place(key) {
            Place::Core(k) => (k.to_string(), false, false),
            Place::Typed(attr, _) => (attr.to_string(), true, false),
            Place::Ext(urn, a) => (format!("{urn}:{a}"), false, a == "manager"),
        };
        let mut out = vec![
            (Clear::Remove, json!({"op": "remove", "path": path})),
            (
                Clear::Null,
                json!({"op": "replace", "path": path, "value": if list { json!([]) } else { Value::Null }}),
            ),
        ];
        if !list && !complex {
            out.push((
                Clear::Empty,
                json!({"op": "replace", "path": path, "value": ""}),
            ));
        }
        out
    }
}

fn empty(v: Option<&AttrValue>) -> bool {
    match v {
        None => true,
        Some(AttrValue::Str(s)) => s.is_empty(),
        _ => false,
    }
}

impl ScimTarget {
    /// Runs the probe (it writes to the LMS: canary users) and stores what it learned.
    pub(crate) async fn probe_dialect(&self, spec: &ProbeSpec) -> Result<ProbeReport, TargetError> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let canary = format!("rostersync-probe-{tag}@invalid.example");
        let mut p = Probe {
            t: self,
            rows: Vec::new(),
            learned: DialectSettings {
                value_paths: Some(false),
                ..Default::default()
            },
            lessons: Learned::default(),
            canaries: Vec::new(),
        };
        let result = run(&mut p, spec, &tag, &canary).await;
        // Whatever happened, no canary stays active.
        cleanup(&mut p, spec.delete).await;
        result?;
        let lessons = std::mem::take(&mut p.lessons.lessons);
        self.set_learned(Learned {
            settings: p.learned.clone(),
            lessons,
            probed_at: Some(Utc::now()),
        });
        Ok(ProbeReport {
            at: Utc::now(),
            canary,
            rows: p.rows,
            dialect: self.dialect().summary(),
        })
    }
}

async fn run(
    p: &mut Probe<'_>,
    spec: &ProbeSpec,
    tag: &str,
    canary: &str,
) -> Result<(), TargetError> {
    use RowStatus::{Fail, Ok as Good, Warn};
    let caps = p.t.discover().await?;
    p.row(
        "discovery (/ServiceProviderConfig, /Schemas, /ResourceTypes)",
        if caps.notes.is_empty() {
            "read".to_string()
        } else {
            clip(&caps.notes.join("; "), 300)
        },
        "start from what it says; the probe below checks it",
        Good,
    );
    let external_id = format!("rostersync-probe-{tag}");

    // Find by userName before the canary exists: an empty ListResponse.
    let (a, _) = p.find(FilterAttr::UserName, canary).await?;
    let mut filters: BTreeSet<FilterAttr> = BTreeSet::new();
    let user_name_filter_ok = a.status == 200;
    if !user_name_filter_ok {
        p.row(
            "find by userName (filter userName eq, no match)",
            a.text(),
            "list /Users once per run and match there",
            Warn,
        );
    }

    // Create with every mapped attribute.
    let mut record = Record::new();
    record.insert(USER_NAME.into(), AttrValue::Str(canary.to_string()));
    record.insert(EXTERNAL_ID.into(), AttrValue::Str(external_id.clone()));
    record.insert(ACTIVE.into(), AttrValue::Bool(true));
    for k in &spec.keys {
        record.insert(k.clone(), AttrValue::Str(value_for(k, 1, tag)));
    }
    let body = p.t.resource(&record);
    let a = p.call(reqwest::Method::POST, "/Users", Some(&body)).await?;
    let Some(id) = a.created_id() else {
        p.row(
            "create (POST /Users with every mapped attribute)",
            a.text(),
            "nothing can be synced until the LMS takes this create: fix the mapping or the LMS",
            Fail,
        );
        return Ok(());
    };
    p.canaries.push(id.clone());
    p.row(
        "create (POST /Users with every mapped attribute)",
        a.text(),
        "create each new user with one POST",
        Good,
    );
    let Some(held) = p.read(&id).await? else {
        p.row(
            "read (GET /Users/{id})",
            "404 right after the create",
            "cannot work with this LMS",
            Fail,
        );
        return Ok(());
    };
    p.row(
        "read (GET /Users/{id})",
        "200",
        "read users by id (deep reconcile, after a 409)",
        Good,
    );
    let mut not_kept: BTreeSet<String> = BTreeSet::new();
    for (k, v) in &record {
        if k == USER_NAME || k == ACTIVE {
            continue;
        }
        let got = held.get(k);
        if got != Some(v) {
            not_kept.insert(k.clone());
            p.row(
                format!("{k} kept as sent"),
                format!(
                    "holds {} for {v}",
                    got.map(|g| g.to_string())
                        .unwrap_or_else(|| "nothing".into())
                ),
                "not kept by the LMS: sent when it changes in Entra, not repaired by --deep",
                Warn,
            );
            p.lesson(
                Downgrade::NotKept { key: k.clone() },
                format!(
                    "probe: the canary holds {} for {v}",
                    got.map(|g| g.to_string())
                        .unwrap_or_else(|| "nothing".into())
                ),
            );
        }
    }
    let untyped = a
        .body
        .as_ref()
        .and_then(|b| get_ci(b, "emails"))
        .and_then(|e| e.as_array())
        .is_some_and(|e| !e.is_empty() && e.iter().all(|x| get_ci(x, "type").is_none()));
    p.learned.email_type = Some(!untyped);
    if untyped {
        p.row(
            "emails[].type kept",
            "the e-mails come back without their type",
            "read the primary (or sole) e-mail as the work e-mail; replace the list whole",
            Warn,
        );
    }

    // Lookups.
    if user_name_filter_ok {
        let (a, n) = p.find(FilterAttr::UserName, canary).await?;
        let (_, n_case) = p.find(FilterAttr::UserName, &canary.to_uppercase()).await?;
        if a.status == 200 && n == 1 {
            filters.insert(FilterAttr::UserName);
            p.row(
                "find by userName (filter userName eq)",
                format!(
                    "{}, found{}",
                    a.text(),
                    if n_case == 1 {
                        "; in any case too"
                    } else {
                        "; only in the same case"
                    }
                ),
                "look users up by userName (after a 409, adoption)",
                Good,
            );
        } else {
            p.row(
                "find by userName (filter userName eq)",
                format!("{}, {n} found", a.text()),
                "list /Users once per run and match there",
                Warn,
            );
        }
    }
    let (a, n) = p.find(FilterAttr::ExternalId, &external_id).await?;
    if a.status == 200 && n == 1 && !not_kept.contains(EXTERNAL_ID) {
        filters.insert(FilterAttr::ExternalId);
        p.row(
            "find by externalId (filter externalId eq)",
            format!("{}, found", a.text()),
            "look users up by externalId (after a lost create)",
            Good,
        );
    } else {
        let answer = if a.status == 200 {
            format!("{}, {n} found although the canary has it", a.text())
        } else {
            a.text()
        };
        p.row(
            "find by externalId (filter externalId eq)",
            answer.clone(),
            if filters.contains(&FilterAttr::UserName) {
                "never filter on externalId: the index and userName lookups (checking externalId) carry the lifecycle"
            } else {
                "never filter on externalId: the index and one listing of /Users per run carry the lifecycle"
            },
            Warn,
        );
        p.lesson(
            Downgrade::NoFilter {
                attr: FilterAttr::ExternalId,
            },
            format!("probe: filter externalId eq answered {answer}"),
        );
    }
    p.learned.filter = Some(filters.clone());

    // userName uniqueness: a case variant of the canary's userName.
    let variant = canary.to_uppercase();
    let mut vrec = record.clone();
    // Other e-mails, so that a server unique on e-mails does not answer 409 for them.
    let case_tag = format!("{tag}-case");
    for k in spec.keys.iter().filter(|k| k.starts_with("emails.")) {
        vrec.insert(k.clone(), AttrValue::Str(value_for(k, 1, &case_tag)));
    }
    vrec.insert(USER_NAME.into(), AttrValue::Str(variant.clone()));
    vrec.insert(
        EXTERNAL_ID.into(),
        AttrValue::Str(format!("{external_id}-case")),
    );
    let a = p
        .call(reqwest::Method::POST, "/Users", Some(&p.t.resource(&vrec)))
        .await?;
    if a.status == 409 {
        p.learned.user_name_unique = Some(CaseRule::CaseInsensitive);
        p.row(
            "create the userName in another case",
            a.text(),
            "none needed: the LMS refuses it (409)",
            Good,
        );
    } else if a.ok() {
        if let Some(vid) = a.created_id() {
            p.canaries.push(vid);
        }
        p.learned.user_name_unique = Some(CaseRule::CaseSensitive);
        p.lesson(
            Downgrade::CaseSensitive,
            "probe: a case variant of a userName was created".into(),
        );
        p.row(
            "create the userName in another case",
            format!("{} (a second user)", a.text()),
            "check userNames case-insensitively (one listing of /Users per run) before creating",
            Warn,
        );
    } else {
        p.row(
            "create the userName in another case",
            a.text(),
            "none",
            Warn,
        );
    }

    // Each mapped attribute: change, then clear.
    let mut ops: BTreeSet<PatchOp> = BTreeSet::new();
    let mut no_patch: BTreeSet<String> = BTreeSet::new();
    let mut not_writable: BTreeSet<String> = BTreeSet::new();
    let mut no_clear: BTreeSet<String> = BTreeSet::new();
    let mut clear_by_put: BTreeSet<String> = BTreeSet::new();
    let mut put_ok: Option<bool> = None;
    let mut weakest: Option<Clear> = None;
    let mut remove_refused = false;
    let mut replace_adds: Option<bool> = None;
    // Set once PATCH answered 501/405 to a plain replace: it is not there at all, and every
    // change is tried with PUT only.
    let mut no_patch_at_all = false;
    for k in spec.keys.iter().filter(|k| k.as_str() != MANAGER) {
        let v2 = AttrValue::Str(value_for(k, 2, tag));
        let kept = |r: &Option<Record>| r.as_ref().and_then(|r| r.get(k)) == Some(&v2);
        if no_patch_at_all {
            let pa = p.put(&id, k, Some(&v2)).await?;
            put_ok = Some(put_ok.unwrap_or(true) && pa.ok());
            if !pa.ok() {
                not_writable.insert(k.clone());
            }
            p.row(
                format!("change {k} (PUT)"),
                pa.text(),
                if pa.ok() {
                    "write it with GET + PUT".to_string()
                } else {
                    format!("not possible: {k} can never be changed after the create")
                },
                if pa.ok() { Good } else { Warn },
            );
            let pa = p.put(&id, k, None).await?;
            let gone = pa.ok() && empty(p.read(&id).await?.as_ref().and_then(|r| r.get(k)));
            if !gone && !not_kept.contains(k) {
                no_clear.insert(k.clone());
            }
            p.row(
                format!("clear {k} (PUT without it)"),
                pa.text(),
                if gone {
                    "clear it with GET + PUT".to_string()
                } else if not_kept.contains(k) {
                    "nothing: the LMS computes it".to_string()
                } else {
                    format!("not possible: {k} can never be cleared")
                },
                if gone || not_kept.contains(k) {
                    Good
                } else {
                    Warn
                },
            );
            continue;
        }
        let a = p.patch(&id, p.set_op(PatchOp::Replace, k, &v2)).await?;
        if a.ok() {
            ops.insert(PatchOp::Replace);
            let now = p.read(&id).await?;
            let note = if kept(&now) || not_kept.contains(k) {
                ""
            } else {
                " (but the value did not change)"
            };
            p.row(
                format!("change {k} (PATCH replace)"),
                format!("{}{note}", a.text()),
                "PATCH replace",
                if note.is_empty() { Good } else { Warn },
            );
        } else {
            let patch_unsupported =
                matches!(a.status, 501 | 405) && !ops.contains(&PatchOp::Replace);
            no_patch_at_all = patch_unsupported;
            let pa = p.put(&id, k, Some(&v2)).await?;
            put_ok = Some(put_ok.unwrap_or(true) && pa.ok());
            let (action, status) = if pa.ok() {
                if !patch_unsupported {
                    no_patch.insert(k.clone());
                }
                ("write it with GET + PUT".to_string(), Warn)
            } else {
                not_writable.insert(k.clone());
                (
                    format!("not possible: {k} can never be changed after the create"),
                    Warn,
                )
            };
            if patch_unsupported {
                p.lesson(
                    Downgrade::NoPatch,
                    format!("probe: PATCH replace {k} answered {}", a.text()),
                );
            }
            p.row(
                format!("change {k} (PATCH replace, then PUT)"),
                format!("{}; PUT {}", a.text(), pa.text()),
                action,
                status,
            );
        }
        if no_patch_at_all {
            let pa = p.put(&id, k, None).await?;
            let gone = pa.ok() && empty(p.read(&id).await?.as_ref().and_then(|r| r.get(k)));
            if !gone && !not_kept.contains(k) {
                no_clear.insert(k.clone());
            }
            p.row(
                format!("clear {k} (PUT without it)"),
                pa.text(),
                if gone {
                    "clear it with GET + PUT".to_string()
                } else {
                    format!("not possible: {k} can never be cleared")
                },
                if gone || not_kept.contains(k) {
                    Good
                } else {
                    Warn
                },
            );
            continue;
        }
        if not_kept.contains(k) {
            p.row(
                format!("clear {k}"),
                "not tried",
                "nothing: the LMS computes it (not kept as sent)",
                Good,
            );
            continue;
        }
        // Clear: the forms in order, then PUT.
        let mut tried = Vec::new();
        let mut cleared_by: Option<Clear> = None;
        for (form, op) in p.clear_ops(k) {
            let a = p.patch(&id, op).await?;
            let gone = a.ok() && empty(p.read(&id).await?.as_ref().and_then(|r| r.get(k)));
            tried.push(format!(
                "{} {}",
                match form {
                    Clear::Remove => "remove",
                    Clear::Null => "replace null",
                    _ => "replace \"\"",
                },
                a.short()
            ));
            if form == Clear::Remove && !a.ok() {
                remove_refused = true;
            }
            if gone {
                cleared_by = Some(form);
                if form == Clear::Remove {
                    ops.insert(PatchOp::Remove);
                }
                break;
            }
            // Put the value back before the next form (a refused op may have kept it anyway).
            let _ = p.patch(&id, p.set_op(PatchOp::Replace, k, &v2)).await?;
        }
        match cleared_by {
            Some(form) => {
                weakest = Some(weakest.map_or(form, |w| w.max(form)));
                let how = match form {
                    Clear::Remove => "PATCH remove",
                    Clear::Null => "PATCH replace null",
                    _ => "PATCH replace \"\"",
                };
                p.row(
                    format!("clear {k}"),
                    tried.join("; "),
                    format!("clear it with {how}"),
                    if form == Clear::Remove { Good } else { Warn },
                );
                if replace_adds.is_none() {
                    // Set it again: `replace` of an absent value (RFC 7644 §3.5.2.3 adds it).
                    let a = p.patch(&id, p.set_op(PatchOp::Replace, k, &v2)).await?;
                    let set = a.ok() && kept(&p.read(&id).await?);
                    if set {
                        replace_adds = Some(true);
                        p.row(
                            format!("set {k} again (PATCH replace of an absent value)"),
                            a.text(),
                            "set absent values with replace too",
                            Good,
                        );
                    } else {
                        let b = p.patch(&id, p.set_op(PatchOp::Add, k, &v2)).await?;
                        let added = b.ok() && kept(&p.read(&id).await?);
                        replace_adds = Some(!added);
                        p.row(
                            format!("set {k} again (PATCH replace of an absent value, then add)"),
                            format!("{}; add {}", a.text(), b.text()),
                            if added {
                                "set absent values with add"
                            } else {
                                "set absent values with replace (add does not work either)"
                            },
                            Warn,
                        );
                    }
                }
            }
            None => {
                let pa = p.put(&id, k, None).await?;
                let gone = pa.ok() && empty(p.read(&id).await?.as_ref().and_then(|r| r.get(k)));
                tried.push(format!("PUT without it {}", pa.short()));
                if gone {
                    put_ok = Some(put_ok.unwrap_or(true));
                    clear_by_put.insert(k.clone());
                    p.row(
                        format!("clear {k}"),
                        tried.join("; "),
                        "clear it with GET + PUT",
                        Warn,
                    );
                } else {
                    if matches!(pa.status, 501 | 405) {
                        put_ok = Some(false);
                    }
                    no_clear.insert(k.clone());
                    p.row(format!("clear {k}"), tried.join("; "), format!("not possible: {k} can never be cleared (one warning per user and run when Entra empties it)"), Warn);
                }
            }
        }
    }

    // How rostersync sets a value that is absent (the externalId and the manager below are).
    let absent_op = if replace_adds == Some(false) {
        PatchOp::Add
    } else {
        PatchOp::Replace
    };

    // Adoption: a user made by hand (no externalId), then rostersync's create → 409 → find
    // by userName → PATCH externalId.
    let mname = format!("rostersync-probe-{tag}-m@invalid.example");
    let mut hand = Record::new();
    hand.insert(USER_NAME.into(), AttrValue::Str(mname.clone()));
    hand.insert(ACTIVE.into(), AttrValue::Bool(true));
    let a = p
        .call(reqwest::Method::POST, "/Users", Some(&p.t.resource(&hand)))
        .await?;
    let mid = a.created_id();
    if let Some(mid) = mid.clone() {
        p.canaries.push(mid.clone());
        let mut ours = hand.clone();
        ours.insert(
            EXTERNAL_ID.into(),
            AttrValue::Str(format!("{external_id}-m")),
        );
        let a = p
            .call(reqwest::Method::POST, "/Users", Some(&p.t.resource(&ours)))
            .await?;
        let conflict = a.status == 409;
        if let Some(dup) = a.created_id() {
            p.canaries.push(dup);
        }
        let found = if filters.contains(&FilterAttr::UserName) {
            p.find(FilterAttr::UserName, &mname).await?.1 >= 1
        } else {
            true
        };
        let ext = AttrValue::Str(format!("{external_id}-m"));
        let pa = if no_patch_at_all {
            Answer::no_patch()
        } else {
            p.patch(&mid, p.set_op(absent_op, EXTERNAL_ID, &ext))
                .await?
        };
        let mut how = format!(
            "POST {}; find {}; PATCH {} externalId {}",
            a.short(),
            if found { "found" } else { "not found" },
            absent_op.as_str(),
            pa.text()
        );
        let linked = if pa.ok() {
            true
        } else {
            let put = p.put(&mid, EXTERNAL_ID, Some(&ext)).await?;
            how.push_str(&format!("; PUT {}", put.text()));
            if !put.ok() {
                not_writable.insert(EXTERNAL_ID.to_string());
            } else if !no_patch_at_all {
                no_patch.insert(EXTERNAL_ID.to_string());
                put_ok = Some(put_ok.unwrap_or(true));
            }
            put.ok()
        };
        let (action, status) = match (conflict, linked) {
            (true, true) if pa.ok() => ("adopt it: link by userName and PATCH externalId".to_string(), Good),
            (true, true) => ("adopt it: link by userName and write externalId with GET + PUT".to_string(), Warn),
            (true, false) => ("adopt it through the index only (externalId cannot be written)".to_string(), Warn),
            (false, _) => ("the LMS does not refuse a second user with the same userName: hand-made users are never found by a create; link them by hand".to_string(), Fail),
        };
        p.row(
            "adopt a user made by hand (POST → 409 → find by userName → set externalId)",
            how,
            action,
            status,
        );
    } else {
        p.row(
            "create a user without externalId (for the adoption)",
            a.text(),
            "adoption could not be tried",
            Warn,
        );
    }

    // Manager: set, then clear.
    if spec.manager {
        if let Some(mid) = &mid {
            let v = AttrValue::Str(mid.clone());
            let a = if no_patch_at_all {
                Answer::no_patch()
            } else {
                p.patch(&id, p.set_op(absent_op, MANAGER, &v)).await?
            };
            let set =
                a.ok() && p.read(&id).await?.as_ref().and_then(|r| r.get(MANAGER)) == Some(&v);
            if set {
                ops.insert(PatchOp::Replace);
                p.row(
                    format!("set the manager (PATCH {} …:manager)", absent_op.as_str()),
                    a.text(),
                    "PATCH replace {\"value\": <manager's LMS id>}",
                    Good,
                );
            } else {
                let pa = p.put(&id, MANAGER, Some(&v)).await?;
                if !pa.ok() {
                    not_writable.insert(MANAGER.to_string());
                } else if !no_patch_at_all {
                    no_patch.insert(MANAGER.to_string());
                }
                p.row(
                    format!(
                        "set the manager (PATCH {} …:manager, then PUT)",
                        absent_op.as_str()
                    ),
                    format!("{}; PUT {}", a.text(), pa.text()),
                    if pa.ok() {
                        "write it with GET + PUT"
                    } else {
                        "not possible: manager links cannot be set"
                    },
                    Warn,
                );
            }
            let mut tried = Vec::new();
            let mut cleared = None;
            let forms = if no_patch_at_all {
                Vec::new()
            } else {
                p.clear_ops(MANAGER)
            };
            for (form, op) in forms {
                let a = p.patch(&id, op).await?;
                let gone =
                    a.ok() && empty(p.read(&id).await?.as_ref().and_then(|r| r.get(MANAGER)));
                tried.push(format!(
                    "{} {}",
                    if form == Clear::Remove {
                        "remove"
                    } else {
                        "replace null"
                    },
                    a.short()
                ));
                if form == Clear::Remove && !a.ok() {
                    remove_refused = true;
                }
                if gone {
                    cleared = Some(form);
                    break;
                }
            }
            match cleared {
                Some(form) => {
                    weakest = Some(weakest.map_or(form, |w| w.max(form)));
                    p.row(
                        "clear the manager",
                        tried.join("; "),
                        if form == Clear::Remove {
                            "PATCH remove"
                        } else {
                            "PATCH replace null"
                        },
                        if form == Clear::Remove { Good } else { Warn },
                    );
                }
                None => {
                    let pa = p.put(&id, MANAGER, None).await?;
                    tried.push(format!("PUT without it {}", pa.short()));
                    if pa.ok() {
                        if !no_patch_at_all {
                            clear_by_put.insert(MANAGER.to_string());
                        }
                        p.row(
                            "clear the manager",
                            tried.join("; "),
                            "clear it with GET + PUT",
                            Warn,
                        );
                    } else {
                        no_clear.insert(MANAGER.to_string());
                        p.row("clear the manager", tried.join("; "), "not possible: a manager link can never be removed (warned per user and run)", Warn);
                    }
                }
            }
        }
    }

    // active false, then true.
    for (v, what) in [(false, "deactivate"), (true, "reactivate")] {
        let a = if no_patch_at_all {
            Answer::no_patch()
        } else {
            p.patch(&id, json!({"op": "replace", "path": "active", "value": v}))
                .await?
        };
        let held = p.read(&id).await?.and_then(|r| r.get(ACTIVE).cloned());
        if a.ok() && held == Some(AttrValue::Bool(v)) {
            ops.insert(PatchOp::Replace);
            p.row(
                format!("{what} (PATCH replace active {v})"),
                a.text(),
                "PATCH replace active",
                Good,
            );
        } else {
            let pa = p.put(&id, ACTIVE, Some(&AttrValue::Bool(v))).await?;
            if pa.ok() && !no_patch_at_all {
                no_patch.insert(ACTIVE.to_string());
            }
            p.row(
                format!("{what} (PATCH replace active {v}, then PUT)"),
                format!("{}; PUT {}", a.text(), pa.text()),
                if pa.ok() {
                    "write active with GET + PUT"
                } else {
                    "not possible: users cannot be deactivated"
                },
                if pa.ok() { Warn } else { Fail },
            );
        }
    }

    // The add op (not needed: replace adds absent values) and PUT.
    let plain = |k: &&String| {
        (!k.contains('.') || k.starts_with("name."))
            && !no_patch.contains(*k)
            && !not_kept.contains(*k)
    };
    let add_key = spec
        .keys
        .iter()
        .find(|k| k.as_str() == "title" && plain(k))
        .or_else(|| spec.keys.iter().find(plain))
        .cloned()
        .unwrap_or_else(|| "title".into());
    let a = p
        .patch(
            &id,
            p.set_op(
                PatchOp::Add,
                &add_key,
                &AttrValue::Str(value_for(&add_key, 1, tag)),
            ),
        )
        .await?;
    if a.ok() {
        ops.insert(PatchOp::Add);
    }
    p.row(
        format!("PATCH add ({add_key})"),
        a.text(),
        if a.ok() {
            "not needed: replace sets absent values too"
        } else {
            "never send add (replace sets absent values too)"
        },
        Good,
    );
    if put_ok.is_none() {
        let path = Probe::user_path(&id);
        let got = p.call(reqwest::Method::GET, &path, None).await?;
        if let Some(current) = got.body.filter(|_| got.status == 200) {
            let next =
                super::scim::write::apply_to_resource(&current, &[], &|k| p.t.place(k), true);
            let a = p.call(reqwest::Method::PUT, &path, Some(&next)).await?;
            put_ok = Some(a.ok());
            p.row(
                "PUT /Users/{id} (unchanged)",
                a.text(),
                if a.ok() {
                    "use PUT where PATCH cannot do something"
                } else {
                    "never use PUT"
                },
                Good,
            );
        }
    }

    // What was learned.
    if !ops.contains(&PatchOp::Remove) && remove_refused {
        p.lesson(
            Downgrade::NoPatchOp {
                op: PatchOp::Remove,
            },
            "probe: PATCH remove was refused".into(),
        );
    }
    if !ops.contains(&PatchOp::Add) {
        p.lesson(
            Downgrade::NoPatchOp { op: PatchOp::Add },
            "probe: PATCH add was refused".into(),
        );
    }
    if replace_adds == Some(false) {
        p.lesson(
            Downgrade::ReplaceAddsNothing,
            "probe: replace of an absent value was refused".into(),
        );
    }
    p.learned.replace_adds = Some(replace_adds.unwrap_or(true));
    p.learned.patch_ops = Some(ops);
    p.learned.put = put_ok.or(Some(false));
    p.learned.clear = Some(weakest.unwrap_or(Clear::None));
    p.learned.no_patch = no_patch;
    p.learned.not_writable = not_writable;
    p.learned.no_clear = no_clear;
    p.learned.clear_by_put = clear_by_put;
    p.learned.not_kept = not_kept;
    Ok(())
}

/// Deactivates every canary (deletes them with `delete`, where the LMS supports DELETE).
async fn cleanup(p: &mut Probe<'_>, delete: bool) {
    let ids = std::mem::take(&mut p.canaries);
    if ids.is_empty() {
        return;
    }
    let mut answers = Vec::new();
    let mut deleted = 0;
    for id in &ids {
        let path = Probe::user_path(id);
        if delete {
            match p.call(reqwest::Method::DELETE, &path, None).await {
                Ok(a) if a.ok() || a.status == 404 => {
                    deleted += 1;
                    continue;
                }
                Ok(a) => answers.push(format!("DELETE {}", a.text())),
                Err(e) => answers.push(format!("DELETE: {e}")),
            }
        }
        let a = p
            .patch(
                id,
                json!({"op": "replace", "path": "active", "value": false}),
            )
            .await;
        let ok = match &a {
            Ok(a) if a.ok() => true,
            _ => matches!(p.put(id, ACTIVE, Some(&AttrValue::Bool(false))).await, Ok(a) if a.ok()),
        };
        if !ok {
            answers.push(format!("deactivating {id} failed"));
        }
    }
    let n = ids.len();
    let (answer, action, status) = if delete && deleted == n {
        (
            format!("{n} deleted"),
            "nothing left behind".to_string(),
            RowStatus::Ok,
        )
    } else if answers.is_empty() {
        (
            format!("{n} deactivated{}", if delete { format!(", {deleted} deleted") } else { String::new() }),
            "the canaries stay, inactive, with userNames rostersync-probe-…@invalid.example (delete them in the LMS if you like)".to_string(),
            RowStatus::Ok,
        )
    } else {
        (
            answers.join("; "),
            "deactivate or delete the canaries rostersync-probe-…@invalid.example by hand"
                .to_string(),
            RowStatus::Warn,
        )
    };
    p.row("clean up the canaries", answer, action, status);
}
