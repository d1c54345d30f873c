//! User storage with indexes, resource validation/normalisation, and rendering.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use super::error::ScimError;
use super::filter::{CmpOp, Filter, Source};
use super::schema::{AttrDef, AttrType, Mutability, Registry, Returned, SchemaIdx, CORE_USER_URN};

/// One stored User. `attrs` holds canonical attribute names (as declared in the schema)
/// and extension objects under their canonical URN; `id` and `meta` live outside it.
#[derive(Clone, Debug)]
pub(crate) struct UserRec {
    pub id: String,
    pub seq: u64,
    pub created: DateTime<Utc>,
    pub modified: DateTime<Utc>,
    pub attrs: Map<String, Value>,
}

#[derive(Default)]
pub(crate) struct State {
    pub users: HashMap<String, UserRec>,
    /// Creation order (for paging and `users()`).
    pub order: BTreeMap<u64, String>,
    /// Case-folded userName → ids (`uniqueness: server`, `caseExact: false`: one id, unless
    /// the server compares userNames case-sensitively for uniqueness, `case_sensitive`).
    pub by_user_name: HashMap<String, Vec<String>>,
    /// A partial server's quirk: `Ada@x` and `ada@x` may both exist.
    pub case_sensitive: bool,
    /// externalId (case-exact) → ids; the RFC promises no uniqueness for it.
    pub by_external_id: HashMap<String, Vec<String>>,
    next_seq: u64,
}

pub(crate) fn fold_user_name(s: &str) -> String {
    s.to_lowercase()
}

pub(crate) fn user_name_of(attrs: &Map<String, Value>) -> Option<&str> {
    attrs.get("userName").and_then(Value::as_str)
}

fn external_id_of(attrs: &Map<String, Value>) -> Option<&str> {
    attrs.get("externalId").and_then(Value::as_str)
}

pub(crate) fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl State {
    pub fn new(case_sensitive: bool) -> Self {
        State {
            case_sensitive,
            ..State::default()
        }
    }

    /// Id of the user holding `user_name` (case-insensitive; the exact one first), if any.
    pub fn id_by_user_name(&self, user_name: &str) -> Option<&String> {
        let ids = self.by_user_name.get(&fold_user_name(user_name))?;
        ids.iter()
            .find(|i| {
                self.users
                    .get(*i)
                    .and_then(|r| user_name_of(&r.attrs))
                    .is_some_and(|n| n == user_name)
            })
            .or_else(|| ids.first())
    }

    /// The user other than `except` whose userName collides with `user_name` under the
    /// server's uniqueness rule.
    fn holder(&self, user_name: &str, except: Option<&str>) -> Option<&String> {
        self.by_user_name
            .get(&fold_user_name(user_name))?
            .iter()
            .filter(|i| Some(i.as_str()) != except)
            .find(|i| {
                !self.case_sensitive
                    || self
                        .users
                        .get(*i)
                        .and_then(|r| user_name_of(&r.attrs))
                        .is_some_and(|n| n == user_name)
            })
    }

    fn unindex_name(&mut self, name: &str, id: &str) {
        let key = fold_user_name(name);
        if let Some(v) = self.by_user_name.get_mut(&key) {
            v.retain(|i| i != id);
            if v.is_empty() {
                self.by_user_name.remove(&key);
            }
        }
    }

    /// Inserts a validated resource. 409 `uniqueness` when the userName is taken.
    pub fn insert(&mut self, attrs: Map<String, Value>) -> Result<String, ScimError> {
        let Some(user_name) = user_name_of(&attrs) else {
            return Err(ScimError::invalid_value("userName is required"));
        };
        let key = fold_user_name(user_name);
        if self.holder(user_name, None).is_some() {
            return Err(ScimError::uniqueness(format!(
                "userName \"{user_name}\" is already in use"
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = Utc::now();
        self.next_seq += 1;
        let seq = self.next_seq;
        self.by_user_name.entry(key).or_default().push(id.clone());
        if let Some(x) = external_id_of(&attrs) {
            self.by_external_id
                .entry(x.to_string())
                .or_default()
                .push(id.clone());
        }
        self.order.insert(seq, id.clone());
        self.users.insert(
            id.clone(),
            UserRec {
                id: id.clone(),
                seq,
                created: now,
                modified: now,
                attrs,
            },
        );
        Ok(id)
    }

    /// Replaces the attributes of `id` (PUT / PATCH). Returns false when nothing changed
    /// (then `lastModified` is left alone). 409 when the new userName belongs to another user.
    pub fn update(&mut self, id: &str, attrs: Map<String, Value>) -> Result<bool, ScimError> {
        let Some(old) = self.users.get(id) else {
            return Err(ScimError::not_found(format!("User {id} not found")));
        };
        if old.attrs == attrs {
            return Ok(false);
        }
        let Some(new_name) = user_name_of(&attrs) else {
            return Err(ScimError::mutability("userName is required"));
        };
        let new_key = fold_user_name(new_name);
        if self.holder(new_name, Some(id)).is_some() {
            return Err(ScimError::uniqueness(format!(
                "userName \"{new_name}\" is already in use"
            )));
        }
        let old_name = user_name_of(&old.attrs).map(str::to_string);
        let old_ext = external_id_of(&old.attrs).map(str::to_string);
        let new_ext = external_id_of(&attrs).map(str::to_string);
        if let Some(n) = old_name {
            self.unindex_name(&n, id);
        }
        self.by_user_name
            .entry(new_key)
            .or_default()
            .push(id.to_string());
        if old_ext != new_ext {
            if let Some(x) = old_ext {
                self.remove_external(&x, id);
            }
            if let Some(x) = new_ext {
                self.by_external_id
                    .entry(x)
                    .or_default()
                    .push(id.to_string());
            }
        }
        if let Some(rec) = self.users.get_mut(id) {
            rec.attrs = attrs;
            // Strictly later than before, so a change is always visible in lastModified
            // (its wire form has millisecond precision).
            rec.modified = Utc::now().max(rec.modified + chrono::Duration::milliseconds(1));
        }
        Ok(true)
    }

    fn remove_external(&mut self, x: &str, id: &str) {
        if let Some(v) = self.by_external_id.get_mut(x) {
            v.retain(|i| i != id);
            if v.is_empty() {
                self.by_external_id.remove(x);
            }
        }
    }

    pub fn delete(&mut self, id: &str) -> bool {
        let Some(rec) = self.users.remove(id) else {
            return false;
        };
        self.order.remove(&rec.seq);
        if let Some(n) = user_name_of(&rec.attrs) {
            let n = n.to_string();
            self.unindex_name(&n, id);
        }
        if let Some(x) = external_id_of(&rec.attrs) {
            self.remove_external(x, id);
        }
        true
    }

    /// Candidate ids for a filter from the indexes, or `None` when a full scan is needed.
    /// Top-level `id eq`, `userName eq`, `externalId eq` use an index; `and` needs one indexed
    /// side, `or` both. Candidates must still be checked against the whole filter.
    pub fn candidates(&self, f: &Filter) -> Option<Vec<String>> {
        match f {
            Filter::Cmp {
                target,
                op: CmpOp::Eq,
                value: Value::String(v),
            } if target.ext.is_none() && target.sub.is_none() => match target.attr.as_str() {
                "id" => Some(
                    self.users
                        .get_key_value(v)
                        .map(|(k, _)| k.clone())
                        .into_iter()
                        .collect(),
                ),
                "userName" => Some(
                    self.by_user_name
                        .get(&fold_user_name(v))
                        .cloned()
                        .unwrap_or_default(),
                ),
                "externalId" => Some(self.by_external_id.get(v).cloned().unwrap_or_default()),
                _ => None,
            },
            Filter::And(a, b) => self.candidates(a).or_else(|| self.candidates(b)),
            Filter::Or(a, b) => {
                let mut x = self.candidates(a)?;
                let y = self.candidates(b)?;
                let seen: HashSet<String> = x.iter().cloned().collect();
                x.extend(y.into_iter().filter(|i| !seen.contains(i)));
                Some(x)
            }
            _ => None,
        }
    }

    /// Ids matching `filter` (all users when `None`), in creation order.
    pub fn query(&self, reg: &Registry, base: &str, filter: Option<&Filter>) -> Vec<String> {
        let Some(f) = filter else {
            return self.order.values().cloned().collect();
        };
        let check = |rec: &UserRec| f.matches(&UserView { rec, reg, base });
        match self.candidates(f) {
            Some(ids) => {
                let mut recs: Vec<&UserRec> = ids
                    .iter()
                    .filter_map(|i| self.users.get(i))
                    .filter(|r| check(r))
                    .collect();
                recs.sort_by_key(|r| r.seq);
                recs.dedup_by_key(|r| r.seq);
                recs.into_iter().map(|r| r.id.clone()).collect()
            }
            None => self
                .order
                .values()
                .filter_map(|i| self.users.get(i))
                .filter(|r| check(r))
                .map(|r| r.id.clone())
                .collect(),
        }
    }
}

/// A stored user seen by the filter evaluator (adds `id` and `meta`).
pub(crate) struct UserView<'a> {
    pub rec: &'a UserRec,
    pub reg: &'a Registry,
    pub base: &'a str,
}

impl Source for UserView<'_> {
    fn attr_value(&self, ext: SchemaIdx, attr: &str) -> Option<Cow<'_, Value>> {
        match ext {
            None => match attr {
                "id" => Some(Cow::Owned(Value::String(self.rec.id.clone()))),
                "meta" => Some(Cow::Owned(meta_of(self.rec, self.base))),
                "password" => None,
                _ => self.rec.attrs.get(attr).map(Cow::Borrowed),
            },
            Some(i) => {
                let urn = &self.reg.extensions.get(i)?.id;
                self.rec
                    .attrs
                    .get(urn)
                    .and_then(|o| o.get(attr))
                    .map(Cow::Borrowed)
            }
        }
    }
}

fn meta_of(rec: &UserRec, base: &str) -> Value {
    json!({
        "resourceType": "User",
        "created": timestamp(&rec.created),
        "lastModified": timestamp(&rec.modified),
        "location": format!("{base}/Users/{}", rec.id),
    })
}

/// The full resource as GET returns it (RFC 7643 §3, §8.2): `schemas` lists core plus every
/// extension present; `password` (`returned: never`) is not returned.
pub(crate) fn render(reg: &Registry, rec: &UserRec, base: &str) -> Value {
    let mut out = Map::new();
    out.insert("schemas".into(), Value::Array(reg.schemas_for(&rec.attrs)));
    out.insert("id".into(), Value::String(rec.id.clone()));
    for (k, v) in &rec.attrs {
        if k != "password" {
            out.insert(k.clone(), v.clone());
        }
    }
    out.insert("meta".into(), meta_of(rec, base));
    Value::Object(out)
}

/// Validation options shared by POST, PUT and PATCH.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Opts {
    /// Entra-compatible: `"True"`/`"False"` strings for booleans, manager as a plain string.
    pub lenient: bool,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Validates and canonicalises one value of `def` (a single value when `def` is
/// multi-valued and `single` is true). `Ok(None)` means unassigned (`null`, `[]`, `{}`,
/// RFC 7643 §2.5). Read-only sub-attributes are dropped (RFC 7644 §3.3).
pub(crate) fn normalize_value(
    def: &AttrDef,
    v: &Value,
    single: bool,
    opts: Opts,
    path: &str,
) -> Result<Option<Value>, ScimError> {
    if v.is_null() {
        return Ok(None);
    }
    if def.multi && !single {
        let Value::Array(items) = v else {
            return Err(ScimError::invalid_value(format!(
                "\"{path}\" is multi-valued and must be an array, not {}",
                type_name(v)
            )));
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Some(x) = normalize_value(def, item, true, opts, path)? {
                out.push(x);
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        check_primary(def, &out, path)?;
        return Ok(Some(Value::Array(out)));
    }
    if def.is_complex() {
        let obj = match v {
            Value::Object(o) => Cow::Borrowed(o),
            // Entra and some server libraries send `manager` as a bare id string (docs/scim.md,
            // Reads); accepted only in lenient mode.
            Value::String(s) if opts.lenient && def.sub_attr("value").is_some() && !def.multi => {
                let mut o = Map::new();
                o.insert("value".into(), Value::String(s.clone()));
                Cow::Owned(o)
            }
            _ => {
                return Err(ScimError::invalid_value(format!(
                    "\"{path}\" is complex and must be an object, not {}",
                    type_name(v)
                )))
            }
        };
        let mut out = Map::new();
        for (k, sv) in obj.iter() {
            let Some(sd) = def.sub_attr(k) else {
                return Err(ScimError::invalid_value(format!(
                    "unknown sub-attribute \"{path}.{k}\""
                )));
            };
            if out.contains_key(&sd.name) {
                return Err(ScimError::invalid_value(format!(
                    "sub-attribute \"{path}.{}\" given twice",
                    sd.name
                )));
            }
            if sd.mutability == Mutability::ReadOnly {
                continue;
            }
            if let Some(x) = normalize_value(sd, sv, false, opts, &format!("{path}.{}", sd.name))? {
                out.insert(sd.name.clone(), x);
            }
        }
        return Ok((!out.is_empty()).then_some(Value::Object(out)));
    }
    let ok = match def.ty {
        AttrType::String | AttrType::Reference | AttrType::Binary => v.is_string(),
        AttrType::DateTime => v
            .as_str()
            .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        AttrType::Boolean => {
            if v.is_boolean() {
                true
            } else if let (true, Some(s)) = (opts.lenient, v.as_str()) {
                // Entra's default job sends "True"/"False" (docs/scim.md).
                if s.eq_ignore_ascii_case("true") {
                    return Ok(Some(Value::Bool(true)));
                } else if s.eq_ignore_ascii_case("false") {
                    return Ok(Some(Value::Bool(false)));
                }
                false
            } else {
                false
            }
        }
        AttrType::Integer => v.is_i64() || v.is_u64(),
        AttrType::Decimal => v.is_number(),
        AttrType::Complex => false,
    };
    if !ok {
        return Err(ScimError::invalid_value(format!(
            "\"{path}\" must be of type {:?}, not {} {v}",
            def.ty,
            type_name(v)
        )));
    }
    Ok(Some(v.clone()))
}

/// At most one element may carry `primary: true` (RFC 7643 §2.4).
pub(crate) fn check_primary(def: &AttrDef, items: &[Value], path: &str) -> Result<(), ScimError> {
    if def.is_complex() {
        let n = items
            .iter()
            .filter(|e| e.get("primary") == Some(&Value::Bool(true)))
            .count();
        if n > 1 {
            return Err(ScimError::invalid_value(format!(
                "at most one \"{path}\" value may have primary true"
            )));
        }
    }
    Ok(())
}

/// Validates a POST/PUT body and returns the canonical attribute map (RFC 7643 §3, §3.3,
/// RFC 7644 §3.3; docs/scim.md):
/// - `schemas` is required, must contain the core User URN, and may only list declared
///   extensions;
/// - each key is a core attribute (case-insensitive, RFC 7643 §2.1) or a declared extension
///   URN that is also listed in `schemas`;
/// - read-only attributes (`id`, `meta`, `groups`) are ignored; `null`/`[]` mean unassigned;
/// - `userName` must be a non-empty string.
pub(crate) fn normalize_resource(
    reg: &Registry,
    body: &Value,
    opts: Opts,
) -> Result<Map<String, Value>, ScimError> {
    let Value::Object(obj) = body else {
        return Err(ScimError::invalid_syntax(
            "the resource must be a JSON object",
        ));
    };
    let schemas_v = obj
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("schemas"))
        .map(|(_, v)| v);
    let Some(Value::Array(schemas)) = schemas_v else {
        return Err(ScimError::invalid_value(
            "\"schemas\" is required and must be an array of schema URIs",
        ));
    };
    let mut listed: Vec<Option<usize>> = Vec::new();
    for s in schemas {
        let Some(s) = s.as_str() else {
            return Err(ScimError::invalid_value("\"schemas\" must hold strings"));
        };
        if s.eq_ignore_ascii_case(CORE_USER_URN) {
            listed.push(None);
        } else if let Some(i) = reg.extension(s) {
            listed.push(Some(i));
        } else {
            return Err(ScimError::invalid_value(format!(
                "schema \"{s}\" is not declared by this server for Users"
            )));
        }
    }
    if !listed.contains(&None) {
        return Err(ScimError::invalid_value(format!(
            "\"schemas\" must contain {CORE_USER_URN}"
        )));
    }

    let mut out = Map::new();
    for (k, v) in obj {
        if k.eq_ignore_ascii_case("schemas") {
            continue;
        }
        if k.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("urn:")) {
            let Some(i) = reg.extension(k) else {
                return Err(ScimError::invalid_value(format!(
                    "\"{k}\" is not a schema extension declared by this server"
                )));
            };
            if !listed.contains(&Some(i)) {
                return Err(ScimError::invalid_value(format!(
                    "extension \"{k}\" is used but not listed in \"schemas\""
                )));
            }
            let ext = &reg.extensions[i];
            if out.contains_key(&ext.id) {
                return Err(ScimError::invalid_value(format!("\"{k}\" given twice")));
            }
            if let Some(m) = normalize_extension(reg, i, v, opts)? {
                out.insert(ext.id.clone(), Value::Object(m));
            }
            continue;
        }
        let Some(def) = reg.core.attr(k) else {
            return Err(ScimError::invalid_value(format!(
                "unknown attribute \"{k}\" (not in {CORE_USER_URN})"
            )));
        };
        if out.contains_key(&def.name) {
            return Err(ScimError::invalid_value(format!(
                "attribute \"{}\" given twice",
                def.name
            )));
        }
        if def.mutability == Mutability::ReadOnly {
            continue;
        }
        if let Some(x) = normalize_value(def, v, false, opts, &def.name)? {
            out.insert(def.name.clone(), x);
        }
    }
    check_required(reg, &out).map_err(|e| e.with_type("invalidValue"))?;
    Ok(out)
}

/// Validates an extension object (`{attr: value}`) of extension `i`.
pub(crate) fn normalize_extension(
    reg: &Registry,
    i: usize,
    v: &Value,
    opts: Opts,
) -> Result<Option<Map<String, Value>>, ScimError> {
    let ext = &reg.extensions[i];
    let obj = match v {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        _ => {
            return Err(ScimError::invalid_value(format!(
                "\"{}\" must be an object",
                ext.id
            )))
        }
    };
    let mut m = Map::new();
    for (ak, av) in obj {
        let Some(def) = ext.attr(ak) else {
            return Err(ScimError::invalid_value(format!(
                "unknown attribute \"{ak}\" in extension {}",
                ext.id
            )));
        };
        if m.contains_key(&def.name) {
            return Err(ScimError::invalid_value(format!(
                "attribute \"{}\" given twice",
                def.name
            )));
        }
        if def.mutability == Mutability::ReadOnly {
            continue;
        }
        if let Some(x) = normalize_value(def, av, false, opts, &format!("{}:{}", ext.id, def.name))?
        {
            m.insert(def.name.clone(), x);
        }
    }
    Ok((!m.is_empty()).then_some(m))
}

/// Required attributes present (`userName`: non-empty). Errors are `mutability` (the PATCH
/// wording of RFC 7644 §3.5.2.2); POST/PUT re-label them `invalidValue`.
pub(crate) fn check_required(reg: &Registry, attrs: &Map<String, Value>) -> Result<(), ScimError> {
    for def in &reg.core.attrs {
        if def.required && def.mutability != Mutability::ReadOnly {
            let present = match attrs.get(&def.name) {
                None | Some(Value::Null) => false,
                Some(Value::String(s)) => !s.is_empty(),
                Some(_) => true,
            };
            if !present {
                return Err(ScimError::mutability(format!(
                    "\"{}\" is required and must not be empty",
                    def.name
                )));
            }
        }
    }
    Ok(())
}

/// `attributes` / `excludedAttributes` (RFC 7644 §3.9) applied to a rendered resource.
/// Unknown names are ignored. `id` and `schemas` (`returned: always`) are always kept.
pub(crate) fn project(
    reg: &Registry,
    resource: Value,
    attributes: Option<&str>,
    excluded: Option<&str>,
) -> Value {
    let Value::Object(full) = resource else {
        return resource;
    };
    let parse = |list: &str| -> Vec<(Option<String>, String, Option<String>)> {
        list.split(',')
            .filter_map(|p| {
                let r = super::filter::resolve(reg, p.trim()).ok()?;
                let attr = r.attr?;
                let urn = r.ext.map(|i| reg.extensions[i].id.clone());
                Some((urn, attr.name.clone(), r.sub.map(|s| s.name.clone())))
            })
            .collect()
    };
    let always = |reg: &Registry, k: &str| {
        k == "schemas"
            || reg
                .core
                .attr(k)
                .is_some_and(|d| d.returned == Returned::Always)
    };
    if let Some(list) = attributes.filter(|s| !s.trim().is_empty()) {
        let wanted = parse(list);
        let mut out = Map::new();
        for (k, v) in &full {
            if always(reg, k) {
                out.insert(k.clone(), v.clone());
            }
        }
        for (urn, attr, sub) in wanted {
            let src = match &urn {
                None => Some(&full),
                Some(u) => full.get(u).and_then(Value::as_object),
            };
            let Some(val) = src.and_then(|m| m.get(&attr)) else {
                continue;
            };
            let picked = match &sub {
                None => Some(val.clone()),
                Some(s) => pick_sub(val, s),
            };
            let Some(picked) = picked else { continue };
            let dest = match &urn {
                None => &mut out,
                Some(u) => {
                    let e = out
                        .entry(u.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    match e.as_object_mut() {
                        Some(m) => m,
                        None => continue,
                    }
                }
            };
            merge_into(dest, &attr, picked);
        }
        tidy_projection(&mut out);
        if let Some(Value::Array(s)) = full.get("schemas") {
            let kept: Vec<Value> = s
                .iter()
                .filter(|u| {
                    u.as_str()
                        .is_some_and(|u| u == CORE_USER_URN || out.contains_key(u))
                })
                .cloned()
                .collect();
            out.insert("schemas".into(), Value::Array(kept));
        }
        return Value::Object(out);
    }
    let mut out = full;
    if let Some(list) = excluded {
        for (urn, attr, sub) in parse(list) {
            if urn.is_none() && always(reg, &attr) {
                continue;
            }
            let container = match &urn {
                None => Some(&mut out),
                Some(u) => out.get_mut(u).and_then(Value::as_object_mut),
            };
            let Some(container) = container else { continue };
            match sub {
                None => {
                    container.remove(&attr);
                }
                Some(s) => match container.get_mut(&attr) {
                    Some(Value::Object(o)) => {
                        o.remove(&s);
                    }
                    Some(Value::Array(a)) => a.iter_mut().for_each(|e| {
                        if let Some(o) = e.as_object_mut() {
                            o.remove(&s);
                        }
                    }),
                    _ => {}
                },
            }
        }
    }
    Value::Object(out)
}

fn pick_sub(val: &Value, sub: &str) -> Option<Value> {
    match val {
        Value::Object(o) => {
            let x = o.get(sub)?;
            let mut m = Map::new();
            m.insert(sub.to_string(), x.clone());
            Some(Value::Object(m))
        }
        // Keep one (possibly empty) object per element so that picks of several
        // sub-attributes of the same attribute line up when merged; `tidy` drops empties.
        Value::Array(a) => {
            let items: Vec<Value> = a
                .iter()
                .map(|e| pick_sub(e, sub).unwrap_or_else(|| Value::Object(Map::new())))
                .collect();
            Some(Value::Array(items))
        }
        _ => None,
    }
}

fn merge_into(dest: &mut Map<String, Value>, attr: &str, picked: Value) {
    match (dest.get_mut(attr), picked) {
        (Some(Value::Object(have)), Value::Object(add)) => have.extend(add),
        (Some(Value::Array(have)), Value::Array(add)) => {
            for (h, a) in have.iter_mut().zip(add) {
                if let (Some(h), Value::Object(a)) = (h.as_object_mut(), a) {
                    h.extend(a);
                }
            }
        }
        (_, picked) => {
            dest.insert(attr.to_string(), picked);
        }
    }
}

fn tidy_projection(m: &mut Map<String, Value>) {
    for v in m.values_mut() {
        match v {
            Value::Array(a) => a.retain(|e| e.as_object().is_none_or(|o| !o.is_empty())),
            Value::Object(o) => tidy_projection(o),
            _ => {}
        }
    }
    m.retain(|_, v| match v {
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    });
}
