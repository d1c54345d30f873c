//! How record changes become SCIM writes under a dialect: the PATCH operations (RFC 7644
//! §3.5.2), the changes left to a GET + PUT (§3.5.1), and those the LMS cannot take at all.
//! Pure: no I/O.

use serde_json::{json, Map, Value};

use super::{ext_value, scalar, typed_element, Place};
use crate::lms::dialect::{Clear, Dialect, Form, PatchOp};
use crate::model::record::{AttrChange, AttrValue, Record};

/// One PATCH operation and what it does (to blame it when the server refuses the request).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PatchPart {
    pub op: Value,
    pub kind: PatchOp,
    pub form: Form,
    pub path: String,
    /// The record keys this operation writes.
    pub keys: Vec<String>,
}

/// A change rostersync cannot make on this LMS.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Impossible {
    pub key: String,
    pub clearing: bool,
    pub why: String,
}

#[derive(Debug, Default)]
pub(crate) struct WritePlan {
    pub patch: Vec<PatchPart>,
    /// Changes made by GET + PUT of the whole resource.
    pub put: Vec<AttrChange>,
    pub impossible: Vec<Impossible>,
}

/// Plans the writes of `changes`; `record` is the complete desired record (typed lists are
/// written whole, so their unchanged elements come from it).
pub(crate) fn plan(
    d: &Dialect,
    changes: &[AttrChange],
    record: &Record,
    place: &dyn Fn(&str) -> Place<'_>,
) -> WritePlan {
    let mut out = WritePlan::default();
    let mut lists_done: Vec<String> = Vec::new();
    for c in changes {
        let key = c.key.as_str();
        let clearing = c.new.is_none();
        if !clearing && d.not_writable.contains(key) {
            out.impossible.push(Impossible {
                key: key.to_string(),
                clearing,
                why: "the LMS does not let it change after the create".into(),
            });
            continue;
        }
        if clearing && d.no_clear.contains(key) {
            out.impossible.push(Impossible {
                key: key.to_string(),
                clearing,
                why: "the LMS never lets it be cleared".into(),
            });
            continue;
        }
        let by_put =
            !d.patch() || d.no_patch.contains(key) || (clearing && d.clear_by_put.contains(key));
        if by_put {
            put_or_impossible(d, c, &mut out, "the LMS refuses to PATCH it");
            continue;
        }
        match place(key) {
            Place::Typed(attr, ty) => {
                if d.value_paths && c.old.is_some() && !clearing {
                    let (Some(op), Some(v)) = (d.set_op(), c.new.as_ref()) else {
                        put_or_impossible(d, c, &mut out, "no PATCH op sets it");
                        continue;
                    };
                    let path = format!("{attr}[type eq \"{ty}\"].value");
                    out.patch.push(PatchPart {
                        op: json!({"op": op.as_str(), "path": path, "value": scalar(v)}),
                        kind: op,
                        form: Form::ValuePath,
                        path,
                        keys: vec![key.to_string()],
                    });
                    continue;
                }
                if lists_done.iter().any(|a| a == attr) {
                    continue;
                }
                lists_done.push(attr.to_string());
                // Every change of this list goes into one operation.
                let group: Vec<&AttrChange> = changes
                    .iter()
                    .filter(|x| matches!(place(&x.key), Place::Typed(a, _) if a == attr))
                    .filter(|x| !d.value_paths || x.old.is_none() || x.new.is_none())
                    .collect();
                let keys: Vec<String> = group.iter().map(|x| x.key.clone()).collect();
                let items: Vec<Value> = record
                    .iter()
                    .filter_map(|(k, v)| match place(k) {
                        Place::Typed(a, t) if a == attr => Some(typed_element(t, scalar(v))),
                        _ => None,
                    })
                    .collect();
                if !items.is_empty() {
                    let absent = group.iter().all(|x| write_absent(x.old.as_ref()));
                    match d.set_op_for(absent) {
                        Some(op) => out.patch.push(PatchPart {
                            op: json!({"op": op.as_str(), "path": attr, "value": items}),
                            kind: op,
                            form: if absent {
                                Form::WholeListAbsent
                            } else {
                                Form::WholeList
                            },
                            path: attr.to_string(),
                            keys,
                        }),
                        None => {
                            for x in group {
                                put_or_impossible(d, x, &mut out, "no PATCH op sets it");
                            }
                        }
                    }
                    continue;
                }
                match clear_op(d, attr, Shape::List) {
                    Some(part) => out.patch.push(PatchPart { keys, ..part }),
                    None => {
                        for x in group {
                            put_or_impossible(d, x, &mut out, "PATCH cannot clear it here");
                        }
                    }
                }
            }
            p => {
                let (path, shape) = match &p {
                    Place::Core(k) => (k.to_string(), Shape::Scalar),
                    Place::Ext(urn, a) if *a == "manager" => (format!("{urn}:{a}"), Shape::Complex),
                    Place::Ext(urn, a) => (format!("{urn}:{a}"), Shape::Scalar),
                    Place::Typed(..) => unreachable!("handled above"),
                };
                match &c.new {
                    Some(v) => {
                        let value = match &p {
                            Place::Ext(_, a) => ext_value(a, scalar(v)),
                            _ => scalar(v),
                        };
                        let absent = write_absent(c.old.as_ref());
                        match d.set_op_for(absent) {
                            Some(op) => out.patch.push(PatchPart {
                                op: json!({"op": op.as_str(), "path": path, "value": value}),
                                kind: op,
                                form: if absent { Form::SetAbsent } else { Form::Set },
                                path,
                                keys: vec![key.to_string()],
                            }),
                            None => put_or_impossible(d, c, &mut out, "no PATCH op sets it"),
                        }
                    }
                    None => match clear_op(d, &path, shape) {
                        Some(part) => out.patch.push(PatchPart {
                            keys: vec![key.to_string()],
                            ..part
                        }),
                        None => put_or_impossible(d, c, &mut out, "PATCH cannot clear it here"),
                    },
                }
            }
        }
    }
    out
}

/// Whether the attribute has no value now (`""` is none).
fn write_absent(old: Option<&AttrValue>) -> bool {
    match old {
        None => true,
        Some(AttrValue::Str(s)) => s.is_empty(),
        Some(_) => false,
    }
}

fn put_or_impossible(d: &Dialect, c: &AttrChange, out: &mut WritePlan, why: &str) {
    if d.put {
        out.put.push(c.clone());
    } else {
        out.impossible.push(Impossible {
            key: c.key.clone(),
            clearing: c.new.is_none(),
            why: format!("{why} and PUT is not supported"),
        });
    }
}

/// What is being cleared: a string, a complex attribute (the manager) or a whole list.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Scalar,
    Complex,
    List,
}

/// The PATCH op that clears `path` under the dialect's clearing form, if PATCH can clear it.
fn clear_op(d: &Dialect, path: &str, shape: Shape) -> Option<PatchPart> {
    let part = |op: Value, kind, form| PatchPart {
        op,
        kind,
        form,
        path: path.to_string(),
        keys: Vec::new(),
    };
    let replace = d.patch_ops.contains(&PatchOp::Replace);
    match d.clear {
        Clear::Remove if d.patch_ops.contains(&PatchOp::Remove) => Some(part(
            json!({"op": "remove", "path": path}),
            PatchOp::Remove,
            Form::Clear(Clear::Remove),
        )),
        // RFC 7643 §2.5: null and [] both mean unassigned.
        Clear::Remove | Clear::Null if replace => {
            let empty = if shape == Shape::List {
                json!([])
            } else {
                Value::Null
            };
            Some(part(
                json!({"op": "replace", "path": path, "value": empty}),
                PatchOp::Replace,
                Form::Clear(Clear::Null),
            ))
        }
        Clear::Empty if replace && shape == Shape::Scalar => Some(part(
            json!({"op": "replace", "path": path, "value": ""}),
            PatchOp::Replace,
            Form::Clear(Clear::Empty),
        )),
        _ => None,
    }
}

/// Applies changes to a resource read with GET, for a PUT (RFC 7644 §3.5.1): values set or
/// dropped, read-only `meta` and `groups` left out, every extension used listed in `schemas`.
pub(crate) fn apply_to_resource(
    resource: &Value,
    changes: &[AttrChange],
    place: &dyn Fn(&str) -> Place<'_>,
    email_type: bool,
) -> Value {
    let mut root: Map<String, Value> = resource.as_object().cloned().unwrap_or_default();
    root.retain(|k, _| !k.eq_ignore_ascii_case("meta") && !k.eq_ignore_ascii_case("groups"));
    for c in changes {
        let new = c.new.as_ref().map(scalar);
        match place(&c.key) {
            Place::Core(k) => match k.split_once('.') {
                Some((parent, sub)) => {
                    let slot = entry_ci(&mut root, parent, || json!({}));
                    if let Value::Object(o) = slot {
                        set_or_drop(o, sub, new);
                    }
                }
                None => set_or_drop(&mut root, k, new),
            },
            Place::Typed(attr, ty) => {
                let slot = entry_ci(&mut root, attr, || json!([]));
                if !slot.is_array() {
                    *slot = json!([]);
                }
                if let Value::Array(items) = slot {
                    let is_ty = |e: &Value| {
                        e.get("type")
                            .and_then(Value::as_str)
                            .is_some_and(|t| t.eq_ignore_ascii_case(ty))
                    };
                    let untyped_work = |e: &Value, n: usize| {
                        ty == "work"
                            && (!email_type || e.get("type").is_none())
                            && (n == 1 || e.get("primary") == Some(&Value::Bool(true)))
                    };
                    let n = items.len();
                    let pos = items
                        .iter()
                        .position(is_ty)
                        .or_else(|| items.iter().position(|e| untyped_work(e, n)));
                    match (pos, new) {
                        (Some(i), Some(v)) => items[i] = typed_element(ty, v),
                        (None, Some(v)) => items.push(typed_element(ty, v)),
                        (Some(i), None) => {
                            items.remove(i);
                        }
                        (None, None) => {}
                    }
                }
            }
            Place::Ext(urn, a) => {
                let present = root.keys().any(|k| k.eq_ignore_ascii_case(&urn));
                if new.is_none() && !present {
                    continue;
                }
                let slot = entry_ci(&mut root, &urn, || json!({}));
                if let Value::Object(o) = slot {
                    set_or_drop(o, a, new.map(|v| ext_value(a, v)));
                }
            }
        }
    }
    // Extensions emptied by the changes go; the others are listed in `schemas`.
    let urns: Vec<String> = root
        .iter()
        .filter(|(k, v)| k.to_ascii_lowercase().starts_with("urn:") && v.is_object())
        .filter(|(_, v)| v.as_object().is_some_and(|o| !o.is_empty()))
        .map(|(k, _)| k.clone())
        .collect();
    root.retain(|k, v| {
        !(k.to_ascii_lowercase().starts_with("urn:") && v.as_object().is_some_and(Map::is_empty))
    });
    let mut schemas: Vec<Value> = vec![Value::String(super::CORE_USER.to_string())];
    schemas.extend(urns.into_iter().map(Value::String));
    root.retain(|k, _| !k.eq_ignore_ascii_case("schemas"));
    root.insert("schemas".into(), Value::Array(schemas));
    // Lists emptied by the changes go too (RFC 7643 §2.5: unassigned).
    root.retain(|_, v| !v.as_array().is_some_and(Vec::is_empty));
    Value::Object(root)
}

fn entry_ci<'a>(
    m: &'a mut Map<String, Value>,
    name: &str,
    make: impl FnOnce() -> Value,
) -> &'a mut Value {
    let key = m
        .keys()
        .find(|k| k.eq_ignore_ascii_case(name))
        .cloned()
        .unwrap_or_else(|| name.to_string());
    m.entry(key).or_insert_with(make)
}

fn set_or_drop(m: &mut Map<String, Value>, name: &str, v: Option<Value>) {
    let key = m.keys().find(|k| k.eq_ignore_ascii_case(name)).cloned();
    match (key, v) {
        (Some(k), Some(v)) => {
            m.insert(k, v);
        }
        (None, Some(v)) => {
            m.insert(name.to_string(), v);
        }
        (Some(k), None) => {
            m.remove(&k);
        }
        (None, None) => {}
    }
}

/// The values a change set writes, in the record vocabulary (to compare with what the LMS
/// answers).
pub(crate) fn written(changes: &[AttrChange]) -> Record {
    changes
        .iter()
        .filter_map(|c| Some((c.key.clone(), c.new.clone()?)))
        .collect()
}

/// Two record values are the same for SCIM when they are equal, `""` being no value.
pub(crate) fn same(a: Option<&AttrValue>, b: Option<&AttrValue>) -> bool {
    let norm = |v: Option<&AttrValue>| match v {
        Some(AttrValue::Str(s)) if s.is_empty() => None,
        other => other.cloned(),
    };
    norm(a) == norm(b)
}
