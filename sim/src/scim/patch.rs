//! PATCH (RFC 7644 §3.5.2; docs/scim.md). Operations are applied, in order, to a copy of the
//! stored attributes; the caller commits the copy only when every operation succeeded
//! (the request is atomic).

use serde_json::{Map, Value};

use super::error::ScimError;
use super::filter::{parse_patch_path, resolve, Filter};
use super::schema::{AttrDef, Mutability, Registry, SchemaIdx, PATCH_OP_URN};
use super::store::{check_primary, check_required, normalize_value, Opts};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Replace,
}

fn get_key<'a>(obj: &'a Map<String, Value>, key: &str, lenient: bool) -> Option<&'a Value> {
    if lenient {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    } else {
        obj.get(key)
    }
}

/// Applies a PatchOp body to `attrs`. On error `attrs` may be half-modified: pass a copy.
pub(crate) fn apply_patch(
    reg: &Registry,
    attrs: &mut Map<String, Value>,
    body: &Value,
    opts: Opts,
) -> Result<(), ScimError> {
    let Value::Object(obj) = body else {
        return Err(ScimError::invalid_syntax(
            "the PATCH body must be a JSON object",
        ));
    };
    let has_urn = obj
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("schemas"))
        .and_then(|(_, v)| v.as_array())
        .is_some_and(|a| {
            a.iter().any(|s| {
                s.as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(PATCH_OP_URN))
            })
        });
    if !has_urn {
        return Err(ScimError::invalid_syntax(format!(
            "\"schemas\" must contain {PATCH_OP_URN}"
        )));
    }
    // "Operations" with a capital O (RFC 7644 §3.5.2; docs/scim.md).
    let Some(ops) = get_key(obj, "Operations", opts.lenient) else {
        let near = obj.keys().find(|k| k.eq_ignore_ascii_case("Operations"));
        return Err(ScimError::invalid_syntax(match near {
            Some(k) => format!("found \"{k}\"; the member is spelled \"Operations\""),
            None => "\"Operations\" is required".to_string(),
        }));
    };
    let Value::Array(ops) = ops else {
        return Err(ScimError::invalid_syntax("\"Operations\" must be an array"));
    };
    if ops.is_empty() {
        return Err(ScimError::invalid_syntax(
            "\"Operations\" must hold one or more operations",
        ));
    }
    for (n, op) in ops.iter().enumerate() {
        apply_one(reg, attrs, op, opts).map_err(|mut e| {
            e.detail = format!("Operations[{n}]: {}", e.detail);
            e
        })?;
        cleanup(reg, attrs);
    }
    // A required attribute that becomes unassigned → mutability (RFC 7644 §3.5.2.2).
    check_required(reg, attrs)?;
    for def in &reg.core.attrs {
        if let Some(Value::Array(a)) = attrs.get(&def.name) {
            check_primary(def, a, &def.name)?;
        }
    }
    Ok(())
}

fn apply_one(
    reg: &Registry,
    attrs: &mut Map<String, Value>,
    op: &Value,
    opts: Opts,
) -> Result<(), ScimError> {
    let Value::Object(o) = op else {
        return Err(ScimError::invalid_syntax(
            "each operation must be an object",
        ));
    };
    let Some(name) = get_key(o, "op", opts.lenient).and_then(Value::as_str) else {
        return Err(ScimError::invalid_syntax(
            "\"op\" is required and must be a string",
        ));
    };
    // The RFC spells them in lowercase; Entra capitalises them. Strict by default, any case
    // in lenient mode.
    let matches = |want: &str| {
        if opts.lenient {
            name.eq_ignore_ascii_case(want)
        } else {
            name == want
        }
    };
    let kind = if matches("add") {
        Op::Add
    } else if matches("remove") {
        Op::Remove
    } else if matches("replace") {
        Op::Replace
    } else {
        return Err(ScimError::invalid_syntax(format!(
            "unsupported op \"{name}\" (expected \"add\", \"remove\" or \"replace\")"
        )));
    };
    let path = match get_key(o, "path", opts.lenient) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(ScimError::invalid_path("\"path\" must be a string")),
    };
    let value = get_key(o, "value", opts.lenient);
    if kind != Op::Remove && value.is_none() {
        return Err(ScimError::invalid_value(format!(
            "\"{name}\" needs a \"value\""
        )));
    }

    let Some(path) = path else {
        if kind == Op::Remove {
            // RFC 7644 §3.5.2.2: path is required for remove.
            return Err(ScimError::no_target("remove needs a \"path\""));
        }
        // No path: `value` is an object of attributes, keys may be plain, dotted or
        // URN-qualified (RFC 7644 §3.5.2.1, §3.5.2.3; Entra's aadOptscim062020 shape).
        let Some(Value::Object(vals)) = value else {
            return Err(ScimError::invalid_value(
                "without \"path\", \"value\" must be an object of attributes",
            ));
        };
        for (k, v) in vals {
            if k.eq_ignore_ascii_case("schemas") {
                continue;
            }
            let r = resolve(reg, k).map_err(ScimError::invalid_value)?;
            match r.attr {
                None => match r.ext {
                    Some(i) => apply_extension(reg, attrs, kind, i, Some(v), opts)?,
                    None => {
                        return Err(ScimError::invalid_value(format!(
                            "\"{k}\" is not an attribute"
                        )))
                    }
                },
                Some(def) => apply_attr(
                    reg,
                    attrs,
                    kind,
                    Target {
                        ext: r.ext,
                        def,
                        sub: r.sub,
                        filter: None,
                    },
                    Some(v),
                    opts,
                )?,
            }
        }
        return Ok(());
    };

    let pp = parse_patch_path(reg, path)?;
    match pp.attr {
        None => match pp.ext {
            Some(i) => apply_extension(reg, attrs, kind, i, value, opts),
            None => Err(ScimError::invalid_path(
                "the core schema URN alone is not a path",
            )),
        },
        Some(def) => apply_attr(
            reg,
            attrs,
            kind,
            Target {
                ext: pp.ext,
                def,
                sub: pp.sub,
                filter: pp.filter,
            },
            value,
            opts,
        ),
    }
}

/// Whole-extension target (`urn:…:User` as path or as a key of a path-less value).
fn apply_extension(
    reg: &Registry,
    attrs: &mut Map<String, Value>,
    kind: Op,
    i: usize,
    value: Option<&Value>,
    opts: Opts,
) -> Result<(), ScimError> {
    let ext = &reg.extensions[i];
    match (kind, value) {
        (Op::Remove, _) => {
            attrs.remove(&ext.id);
            Ok(())
        }
        (Op::Replace, Some(Value::Null)) => {
            attrs.remove(&ext.id);
            Ok(())
        }
        (Op::Add, Some(Value::Null)) => Ok(()),
        (_, Some(Value::Object(vals))) => {
            for (k, v) in vals {
                let def = ext.attr(k).ok_or_else(|| {
                    ScimError::invalid_value(format!(
                        "unknown attribute \"{k}\" in extension {}",
                        ext.id
                    ))
                })?;
                apply_attr(
                    reg,
                    attrs,
                    kind,
                    Target {
                        ext: Some(i),
                        def,
                        sub: None,
                        filter: None,
                    },
                    Some(v),
                    opts,
                )?;
            }
            Ok(())
        }
        _ => Err(ScimError::invalid_value(format!(
            "the value for extension {} must be an object",
            ext.id
        ))),
    }
}

struct Target<'r> {
    ext: SchemaIdx,
    def: &'r AttrDef,
    sub: Option<&'r AttrDef>,
    filter: Option<Filter>,
}

fn container<'a>(
    reg: &Registry,
    attrs: &'a mut Map<String, Value>,
    ext: SchemaIdx,
) -> &'a mut Map<String, Value> {
    let Some(i) = ext else { return attrs };
    let urn = reg.extensions[i].id.clone();
    let slot = attrs
        .entry(urn)
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(m) => m,
        _ => unreachable!("the slot was just made an object"),
    }
}

fn is_true(v: &Value, key: &str) -> bool {
    v.get(key) == Some(&Value::Bool(true))
}

/// "Setting primary true on one element makes the server set the others to false"
/// (RFC 7643 §2.4; docs/scim.md).
fn fix_primary(items: &mut [Value], touched: &[usize]) {
    let Some(keep) = touched
        .iter()
        .copied()
        .find(|&i| items.get(i).is_some_and(|e| is_true(e, "primary")))
    else {
        return;
    };
    for (i, e) in items.iter_mut().enumerate() {
        if i != keep && is_true(e, "primary") {
            if let Some(o) = e.as_object_mut() {
                o.insert("primary".into(), Value::Bool(false));
            }
        }
    }
}

/// Does `have` contain every member of `want` (used for lenient remove-by-value)?
fn contains_all(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, v)| h.get(k) == Some(v)),
        _ => have == want,
    }
}

fn apply_attr(
    reg: &Registry,
    attrs: &mut Map<String, Value>,
    kind: Op,
    t: Target<'_>,
    value: Option<&Value>,
    opts: Opts,
) -> Result<(), ScimError> {
    let def = t.def;
    let name = match t.sub {
        Some(s) => format!("{}.{}", def.name, s.name),
        None => def.name.clone(),
    };
    // Mutability (RFC 7644 §3.5.2): readOnly attributes cannot be patched.
    if def.mutability == Mutability::ReadOnly
        || t.sub.is_some_and(|s| s.mutability == Mutability::ReadOnly)
    {
        return Err(ScimError::mutability(format!("\"{name}\" is readOnly")));
    }
    let map = container(reg, attrs, t.ext);
    // immutable: may only be added while unassigned (RFC 7644 §3.5.2).
    if def.mutability == Mutability::Immutable && map.contains_key(&def.name) {
        return Err(ScimError::mutability(format!("\"{name}\" is immutable")));
    }

    if let Some(filter) = &t.filter {
        return apply_filtered(map, kind, def, t.sub, filter, value, opts, &name);
    }

    if kind == Op::Remove {
        match t.sub {
            None => {
                if def.required {
                    return Err(ScimError::mutability(format!(
                        "\"{name}\" is required and cannot be removed"
                    )));
                }
                // Entra removes multi-valued members with a `value` array; strictly the
                // RFC removes all values when no filter is given (§3.5.2.2).
                if let (true, true, Some(v)) =
                    (opts.lenient, def.multi, value.filter(|v| !v.is_null()))
                {
                    let wanted: Vec<&Value> = match v {
                        Value::Array(a) => a.iter().collect(),
                        x => vec![x],
                    };
                    if let Some(Value::Array(items)) = map.get_mut(&def.name) {
                        items.retain(|e| !wanted.iter().any(|w| contains_all(e, w)));
                    }
                } else {
                    map.remove(&def.name);
                }
            }
            Some(sd) => match map.get_mut(&def.name) {
                Some(Value::Object(o)) => {
                    o.remove(&sd.name);
                }
                Some(Value::Array(items)) => {
                    for e in items.iter_mut() {
                        if let Some(o) = e.as_object_mut() {
                            o.remove(&sd.name);
                        }
                    }
                }
                _ => {}
            },
        }
        return Ok(());
    }

    let Some(v) = value else {
        return Err(ScimError::invalid_value("missing \"value\""));
    };

    if let Some(sd) = t.sub {
        let nv = normalize_value(sd, v, false, opts, &name)?;
        if def.multi {
            // `emails.value` without a filter: applies to every element.
            let Some(Value::Array(items)) = map.get_mut(&def.name) else {
                return Err(ScimError::no_target(format!(
                    "\"{name}\": \"{}\" has no values",
                    def.name
                )));
            };
            for e in items.iter_mut() {
                set_sub(e, &sd.name, nv.clone());
            }
            let all: Vec<usize> = (0..items.len()).collect();
            fix_primary(items, &all);
        } else {
            let slot = map
                .entry(def.name.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            set_sub(slot, &sd.name, nv);
        }
        return Ok(());
    }

    if def.multi {
        let nv = match v {
            Value::Array(_) => normalize_value(def, v, false, opts, &name)?,
            // A single value for a multi-valued attribute is taken as a one-element list.
            single => {
                normalize_value(def, single, true, opts, &name)?.map(|x| Value::Array(vec![x]))
            }
        };
        let new_items = match nv {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        };
        if kind == Op::Replace {
            // Multi-valued without filter: the whole array is replaced (§3.5.2.3).
            if new_items.is_empty() {
                map.remove(&def.name);
            } else {
                map.insert(def.name.clone(), Value::Array(new_items));
            }
            return Ok(());
        }
        // add: append values not already present (adding an existing value is a no-op).
        let slot = map
            .entry(def.name.clone())
            .or_insert_with(|| Value::Array(Vec::new()));
        if !slot.is_array() {
            *slot = Value::Array(Vec::new());
        }
        if let Value::Array(items) = slot {
            let mut touched = Vec::new();
            for item in new_items {
                if !items.contains(&item) {
                    items.push(item);
                    touched.push(items.len() - 1);
                }
            }
            fix_primary(items, &touched);
            check_primary(def, items, &name)?;
        }
        return Ok(());
    }

    if def.is_complex() {
        // Complex target: listed sub-attributes are set, others left alone (§3.5.2.1,
        // §3.5.2.3); `null` for a sub-attribute unassigns it.
        let obj: Map<String, Value> = match v {
            Value::Null => {
                if kind == Op::Replace {
                    map.remove(&def.name);
                }
                return Ok(());
            }
            Value::Object(o) => o.clone(),
            other => match normalize_value(def, other, false, opts, &name)? {
                Some(Value::Object(o)) => o,
                _ => Map::new(),
            },
        };
        let mut updates = Vec::new();
        for (k, sv) in &obj {
            let Some(sd) = def.sub_attr(k) else {
                return Err(ScimError::invalid_value(format!(
                    "unknown sub-attribute \"{name}.{k}\""
                )));
            };
            if sd.mutability == Mutability::ReadOnly {
                continue;
            }
            let nv = normalize_value(sd, sv, false, opts, &format!("{name}.{}", sd.name))?;
            updates.push((sd.name.clone(), nv));
        }
        let slot = map
            .entry(def.name.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        for (k, nv) in updates {
            set_sub(slot, &k, nv);
        }
        return Ok(());
    }

    match normalize_value(def, v, false, opts, &name)? {
        Some(x) => {
            map.insert(def.name.clone(), x);
        }
        None => {
            if kind == Op::Replace {
                if def.required {
                    return Err(ScimError::mutability(format!(
                        "\"{name}\" is required and cannot be unassigned"
                    )));
                }
                map.remove(&def.name);
            }
        }
    }
    Ok(())
}

fn set_sub(element: &mut Value, sub: &str, v: Option<Value>) {
    if let Some(o) = element.as_object_mut() {
        match v {
            Some(x) => {
                o.insert(sub.to_string(), x);
            }
            None => {
                o.remove(sub);
            }
        }
    }
}

/// `attr[filter]` and `attr[filter].sub` targets.
#[allow(clippy::too_many_arguments)]
fn apply_filtered(
    map: &mut Map<String, Value>,
    kind: Op,
    def: &AttrDef,
    sub: Option<&AttrDef>,
    filter: &Filter,
    value: Option<&Value>,
    opts: Opts,
    name: &str,
) -> Result<(), ScimError> {
    let no_match = || {
        ScimError::no_target(format!(
            "the value filter on \"{}\" matched no values",
            def.name
        ))
    };
    // A single-valued complex attribute is filtered as a one-element list.
    let single = !def.multi;
    let mut items: Vec<Value> = match map.get(&def.name) {
        Some(Value::Array(a)) => a.clone(),
        Some(o @ Value::Object(_)) => vec![o.clone()],
        _ => return Err(no_match()),
    };
    let matched: Vec<usize> = items
        .iter()
        .enumerate()
        .filter(|(_, e)| filter.matches_element(e))
        .map(|(i, _)| i)
        .collect();
    if matched.is_empty() {
        // RFC 7644 §3.5.2.3 (and Table 9: "a filter that yields no match").
        return Err(no_match());
    }
    match (kind, sub) {
        (Op::Remove, None) => {
            let mut i = 0;
            items.retain(|_| {
                let keep = !matched.contains(&i);
                i += 1;
                keep
            });
        }
        (Op::Remove, Some(sd)) => {
            for &i in &matched {
                set_sub(&mut items[i], &sd.name, None);
            }
        }
        (_, Some(sd)) => {
            let Some(v) = value else {
                return Err(ScimError::invalid_value("missing \"value\""));
            };
            let nv = normalize_value(sd, v, false, opts, name)?;
            for &i in &matched {
                set_sub(&mut items[i], &sd.name, nv.clone());
            }
            fix_primary(&mut items, &matched);
        }
        (_, None) => {
            let Some(v) = value else {
                return Err(ScimError::invalid_value("missing \"value\""));
            };
            let nv = normalize_value(def, v, true, opts, name)?;
            match kind {
                // Replace: matching values are replaced (§3.5.2.3).
                Op::Replace => {
                    for &i in &matched {
                        items[i] = nv.clone().unwrap_or(Value::Null);
                    }
                    items.retain(|e| !e.is_null());
                }
                // Add: the given sub-attributes are merged into matching values.
                _ => {
                    if let Some(Value::Object(add)) = nv {
                        for &i in &matched {
                            if let Some(o) = items[i].as_object_mut() {
                                o.extend(add.clone());
                            }
                        }
                    }
                }
            }
            fix_primary(&mut items, &matched);
        }
    }
    items.retain(|e| e.as_object().is_none_or(|o| !o.is_empty()));
    if items.is_empty() {
        map.remove(&def.name);
    } else if single {
        if let Some(first) = items.into_iter().next() {
            map.insert(def.name.clone(), first);
        }
    } else {
        check_primary(def, &items, name)?;
        map.insert(def.name.clone(), Value::Array(items));
    }
    Ok(())
}

/// Drops unassigned values (`null`, `[]`, `{}`, empty elements) and empty extension objects,
/// so `schemas` (computed from what is present) loses an extension with its last attribute.
fn cleanup(reg: &Registry, attrs: &mut Map<String, Value>) {
    fn tidy(m: &mut Map<String, Value>) {
        for v in m.values_mut() {
            match v {
                Value::Array(a) => {
                    for e in a.iter_mut() {
                        if let Value::Object(o) = e {
                            o.retain(|_, x| !x.is_null());
                        }
                    }
                    a.retain(|e| !e.is_null() && e.as_object().is_none_or(|o| !o.is_empty()));
                }
                Value::Object(o) => o.retain(|_, x| !x.is_null()),
                _ => {}
            }
        }
        m.retain(|_, v| match v {
            Value::Null => false,
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        });
    }
    for e in &reg.extensions {
        if let Some(Value::Object(o)) = attrs.get_mut(&e.id) {
            tidy(o);
        }
    }
    tidy(attrs);
}
