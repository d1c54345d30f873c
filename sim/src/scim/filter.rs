//! Filter parser and evaluator (RFC 7644 §3.4.2.2; docs/scim.md) and the PATCH `path` parser
//! (RFC 7644 §3.5.2, Figure 7).
//!
//! Grammar handled (attribute operators bind tighter than `not` > `and` > `or`, as every
//! parser does):
//! ```text
//! FILTER    = OR
//! OR        = AND *("or" AND)
//! AND       = UNARY *("and" UNARY)
//! UNARY     = "not" "(" FILTER ")" / "(" FILTER ")" / valuePath / attrExp
//! valuePath = attrPath "[" valFilter "]"
//! attrExp   = attrPath "pr" / attrPath compareOp compValue
//! attrPath  = [schemaURN ":"] ATTRNAME ["." subAttr]
//! compValue = JSON false / null / true / number / string
//! ```
//! Attribute names, keywords and operators are case-insensitive (RFC 7643 §2.1).

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Map, Value};

use super::error::ScimError;
use super::schema::{AttrDef, AttrType, Registry, Returned, SchemaIdx};

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    LParen,
    RParen,
    LBracket,
    RBracket,
    Str(String),
    Word(String),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::LParen);
            }
            ')' => {
                chars.next();
                out.push(Tok::RParen);
            }
            '[' => {
                chars.next();
                out.push(Tok::LBracket);
            }
            ']' => {
                chars.next();
                out.push(Tok::RBracket);
            }
            '"' => {
                // A JSON string: find the closing quote, skipping escaped characters, then
                // let the JSON parser decode the escapes (`\"`, `\\`, `\u00e9`, …).
                chars.next();
                let mut end = None;
                while let Some((j, d)) = chars.next() {
                    match d {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = Some(j);
                            break;
                        }
                        _ => {}
                    }
                }
                let Some(end) = end else {
                    return Err(format!("unterminated string starting at offset {i}"));
                };
                let lit = &s[i..=end];
                let v: String = serde_json::from_str(lit)
                    .map_err(|e| format!("invalid JSON string {lit}: {e}"))?;
                out.push(Tok::Str(v));
            }
            _ => {
                let start = i;
                let mut end = s.len();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_whitespace() || matches!(d, '(' | ')' | '[' | ']' | '"') {
                        end = j;
                        break;
                    }
                    chars.next();
                }
                out.push(Tok::Word(s[start..end].to_string()));
            }
        }
    }
    Ok(out)
}

/// Comparison operators (RFC 7644 §3.4.2.2 Table 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Co,
    Sw,
    Ew,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CmpOp {
    fn parse(w: &str) -> Option<CmpOp> {
        Some(match w.to_ascii_lowercase().as_str() {
            "eq" => CmpOp::Eq,
            "ne" => CmpOp::Ne,
            "co" => CmpOp::Co,
            "sw" => CmpOp::Sw,
            "ew" => CmpOp::Ew,
            "gt" => CmpOp::Gt,
            "ge" => CmpOp::Ge,
            "lt" => CmpOp::Lt,
            "le" => CmpOp::Le,
            _ => return None,
        })
    }
}

/// A resolved attribute reference. At top level `attr` is a schema attribute (`ext` says which
/// schema) and `sub` an optional sub-attribute; inside a value filter `attr` is a sub-attribute
/// of the filtered attribute and `ext` is `None`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Target {
    pub ext: SchemaIdx,
    pub attr: String,
    pub sub: Option<String>,
    /// Type and `caseExact` of the attribute actually compared.
    pub ty: AttrType,
    pub case_exact: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Filter {
    Cmp {
        target: Target,
        op: CmpOp,
        value: Value,
    },
    Present(Target),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    /// `attr[filter]`: matches when any element of `attr` matches `inner`.
    ValuePath {
        ext: SchemaIdx,
        attr: String,
        inner: Box<Filter>,
    },
}

/// A name resolved against the registry.
pub(crate) struct Resolved<'r> {
    pub ext: SchemaIdx,
    /// `None` when the whole schema was named (`urn:…:enterprise:2.0:User`).
    pub attr: Option<&'r AttrDef>,
    pub sub: Option<&'r AttrDef>,
}

/// Resolves `[schemaURN ":"] ATTRNAME ["." subAttr]` (RFC 7644 §3.10). Unqualified names are
/// looked up in the core schema only; extension attributes must carry their URN.
pub(crate) fn resolve<'r>(reg: &'r Registry, word: &str) -> Result<Resolved<'r>, String> {
    let (ext, name) = if word
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("urn:"))
    {
        match reg.split_urn(word) {
            Some((idx, "")) => {
                return Ok(Resolved {
                    ext: idx,
                    attr: None,
                    sub: None,
                })
            }
            Some((idx, rest)) => (idx, rest),
            None => return Err(format!("unknown or undeclared schema in \"{word}\"")),
        }
    } else {
        (None, word)
    };
    let mut parts = name.split('.');
    let attr_name = parts.next().unwrap_or_default();
    let sub_name = parts.next();
    if parts.next().is_some() || attr_name.is_empty() || sub_name == Some("") {
        return Err(format!("malformed attribute path \"{word}\""));
    }
    let schema = reg.schema(ext);
    let attr = schema
        .attr(attr_name)
        .ok_or_else(|| format!("unknown attribute \"{attr_name}\" in schema {}", schema.id))?;
    let sub = match sub_name {
        None => None,
        Some(s) => {
            if !attr.is_complex() {
                return Err(format!("attribute \"{}\" has no sub-attributes", attr.name));
            }
            Some(
                attr.sub_attr(s)
                    .ok_or_else(|| format!("unknown sub-attribute \"{}.{s}\"", attr.name))?,
            )
        }
    };
    Ok(Resolved {
        ext,
        attr: Some(attr),
        sub,
    })
}

#[derive(Clone, Copy)]
enum Ctx<'r> {
    Top,
    /// Inside `attr[...]`: names are sub-attributes of this attribute.
    Within(&'r AttrDef),
}

struct Parser<'r> {
    reg: &'r Registry,
    toks: Vec<Tok>,
    pos: usize,
}

type PResult<T> = Result<T, String>;

fn is_kw(t: Option<&Tok>, kw: &str) -> bool {
    matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
}

impl<'r> Parser<'r> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn peek2(&self) -> Option<&Tok> {
        self.toks.get(self.pos + 1)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn expect(&mut self, t: Tok, what: &str) -> PResult<()> {
        match self.next() {
            Some(x) if x == t => Ok(()),
            Some(x) => Err(format!("expected {what}, found {}", describe(&x))),
            None => Err(format!("expected {what}, found end of filter")),
        }
    }

    fn parse_or(&mut self, ctx: Ctx<'r>) -> PResult<Filter> {
        let mut left = self.parse_and(ctx)?;
        while is_kw(self.peek(), "or") {
            self.pos += 1;
            let right = self.parse_and(ctx)?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn parse_and(&mut self, ctx: Ctx<'r>) -> PResult<Filter> {
        let mut left = self.parse_unary(ctx)?;
        while is_kw(self.peek(), "and") {
            self.pos += 1;
            let right = self.parse_unary(ctx)?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn parse_unary(&mut self, ctx: Ctx<'r>) -> PResult<Filter> {
        if is_kw(self.peek(), "not") && self.peek2() == Some(&Tok::LParen) {
            self.pos += 2;
            let inner = self.parse_or(ctx)?;
            self.expect(Tok::RParen, "')'")?;
            return Ok(Filter::Not(Box::new(inner)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let inner = self.parse_or(ctx)?;
            self.expect(Tok::RParen, "')'")?;
            return Ok(inner);
        }
        self.parse_atom(ctx)
    }

    fn parse_atom(&mut self, ctx: Ctx<'r>) -> PResult<Filter> {
        let word = match self.next() {
            Some(Tok::Word(w)) => w,
            Some(t) => {
                return Err(format!(
                    "expected an attribute path, found {}",
                    describe(&t)
                ))
            }
            None => return Err("expected an attribute path, found end of filter".into()),
        };
        let (ext, attr, sub) = match ctx {
            Ctx::Top => {
                let r = resolve(self.reg, &word)?;
                let Some(attr) = r.attr else {
                    return Err(format!("\"{word}\" names a schema, not an attribute"));
                };
                (r.ext, attr, r.sub)
            }
            Ctx::Within(parent) => {
                if word.contains('.') || word.contains(':') {
                    return Err(format!(
                        "\"{word}\": only sub-attribute names of \"{}\" may appear inside [...]",
                        parent.name
                    ));
                }
                let a = parent
                    .sub_attr(&word)
                    .ok_or_else(|| format!("unknown sub-attribute \"{}.{word}\"", parent.name))?;
                (None, a, None)
            }
        };
        if attr.returned == Returned::Never || sub.is_some_and(|s| s.returned == Returned::Never) {
            return Err(format!("attribute \"{word}\" cannot be used in a filter"));
        }

        if self.peek() == Some(&Tok::LBracket) {
            if matches!(ctx, Ctx::Within(_)) {
                return Err("nested value filters are not allowed".into());
            }
            if !attr.is_complex() || sub.is_some() {
                return Err(format!(
                    "value filter \"[...]\" needs a complex attribute, not \"{word}\""
                ));
            }
            self.pos += 1;
            let inner = self.parse_or(Ctx::Within(attr))?;
            self.expect(Tok::RBracket, "']'")?;
            if let Some(Tok::Word(w)) = self.peek() {
                if w.starts_with('.') {
                    return Err(format!(
                        "a sub-attribute after a value filter (\"{w}\") is only valid in a PATCH path"
                    ));
                }
            }
            return Ok(Filter::ValuePath {
                ext,
                attr: attr.name.clone(),
                inner: Box::new(inner),
            });
        }

        let op_word = match self.next() {
            Some(Tok::Word(w)) => w,
            Some(t) => {
                return Err(format!(
                    "expected an operator after \"{word}\", found {}",
                    describe(&t)
                ))
            }
            None => return Err(format!("expected an operator after \"{word}\"")),
        };
        let present = op_word.eq_ignore_ascii_case("pr");
        // The attribute compared: the sub-attribute if named; for a multi-valued complex
        // attribute without one, its `value` sub-attribute (`emails co "x"` ≡
        // `emails.value co "x"`).
        let (leaf, sub_name) = match sub {
            Some(s) => (s, Some(s.name.clone())),
            None if attr.is_complex() && !present => match attr.sub_attr("value") {
                Some(v) if attr.multi => (v, Some(v.name.clone())),
                _ => {
                    return Err(format!(
                        "complex attribute \"{}\" can only be compared through a sub-attribute",
                        attr.name
                    ))
                }
            },
            None => (attr, None),
        };
        let target = Target {
            ext,
            attr: attr.name.clone(),
            sub: sub_name,
            ty: leaf.ty,
            case_exact: leaf.case_exact,
        };
        if present {
            return Ok(Filter::Present(target));
        }
        let op = CmpOp::parse(&op_word)
            .ok_or_else(|| format!("unknown operator \"{op_word}\" after \"{word}\""))?;
        let value = match self.next() {
            Some(Tok::Str(s)) => Value::String(s),
            Some(Tok::Word(w)) => parse_literal(&w).ok_or_else(|| {
                format!("comparison value {w} is not a JSON literal (strings must be quoted)")
            })?,
            Some(t) => {
                return Err(format!(
                    "expected a comparison value, found {}",
                    describe(&t)
                ))
            }
            None => return Err(format!("missing comparison value after \"{op_word}\"")),
        };
        check_types(&word, leaf, op, &value)?;
        Ok(Filter::Cmp { target, op, value })
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::LBracket => "'['".into(),
        Tok::RBracket => "']'".into(),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Word(w) => format!("\"{w}\""),
    }
}

fn parse_literal(w: &str) -> Option<Value> {
    match w.to_ascii_lowercase().as_str() {
        "true" => return Some(Value::Bool(true)),
        "false" => return Some(Value::Bool(false)),
        "null" => return Some(Value::Null),
        _ => {}
    }
    serde_json::from_str::<serde_json::Number>(w)
        .ok()
        .map(Value::Number)
}

/// Operator/value/attribute-type combinations (RFC 7644 §3.4.2.2: `gt`… on boolean or binary
/// must fail with `invalidFilter`).
fn check_types(name: &str, leaf: &AttrDef, op: CmpOp, value: &Value) -> PResult<()> {
    use CmpOp::*;
    if value.is_null() {
        return if matches!(op, Eq | Ne) {
            Ok(())
        } else {
            Err(format!(
                "null can only be compared with eq or ne (\"{name}\")"
            ))
        };
    }
    let ordering = matches!(op, Gt | Ge | Lt | Le);
    let substring = matches!(op, Co | Sw | Ew);
    let ok = match leaf.ty {
        AttrType::String | AttrType::Reference => value.is_string(),
        AttrType::Binary => value.is_string() && !ordering,
        AttrType::DateTime => value
            .as_str()
            .is_some_and(|s| substring || chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        AttrType::Boolean => value.is_boolean() && !ordering && !substring,
        AttrType::Integer | AttrType::Decimal => value.is_number() && !substring,
        AttrType::Complex => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "operator {op:?} with value {value} is not valid for attribute \"{name}\" of type {:?}",
            leaf.ty
        ))
    }
}

/// Parses a `filter` parameter. Errors are 400 `invalidFilter`.
pub(crate) fn parse_filter(reg: &Registry, s: &str) -> Result<Filter, ScimError> {
    let toks = tokenize(s).map_err(ScimError::invalid_filter)?;
    if toks.is_empty() {
        return Err(ScimError::invalid_filter("empty filter"));
    }
    let mut p = Parser { reg, toks, pos: 0 };
    let f = p.parse_or(Ctx::Top).map_err(ScimError::invalid_filter)?;
    if let Some(t) = p.peek() {
        return Err(ScimError::invalid_filter(format!(
            "unexpected {} after a complete filter",
            describe(t)
        )));
    }
    Ok(f)
}

/// A parsed PATCH path (`PATH = attrPath / valuePath [subAttr]`, RFC 7644 §3.5.2 Figure 7).
pub(crate) struct PatchPath<'r> {
    pub ext: SchemaIdx,
    /// `None` when the path names a whole extension schema.
    pub attr: Option<&'r AttrDef>,
    pub sub: Option<&'r AttrDef>,
    pub filter: Option<Filter>,
}

/// Parses a PATCH `path`: malformed or unknown → 400 `invalidPath`; a bad value filter
/// inside it → 400 `invalidFilter`.
pub(crate) fn parse_patch_path<'r>(reg: &'r Registry, s: &str) -> Result<PatchPath<'r>, ScimError> {
    let toks = tokenize(s).map_err(ScimError::invalid_path)?;
    let mut p = Parser { reg, toks, pos: 0 };
    let word = match p.next() {
        Some(Tok::Word(w)) => w,
        _ => return Err(ScimError::invalid_path(format!("malformed path \"{s}\""))),
    };
    let r = resolve(reg, &word).map_err(ScimError::invalid_path)?;
    let mut out = PatchPath {
        ext: r.ext,
        attr: r.attr,
        sub: r.sub,
        filter: None,
    };
    if out.attr.is_none() && out.ext.is_none() {
        return Err(ScimError::invalid_path(
            "the core schema URN alone is not a path",
        ));
    }
    if p.peek() == Some(&Tok::LBracket) {
        let attr = match out.attr {
            Some(a) if a.is_complex() && out.sub.is_none() => a,
            _ => {
                return Err(ScimError::invalid_path(format!(
                    "value filter in \"{s}\" needs a complex attribute"
                )))
            }
        };
        p.pos += 1;
        let f = p
            .parse_or(Ctx::Within(attr))
            .map_err(ScimError::invalid_filter)?;
        p.expect(Tok::RBracket, "']'")
            .map_err(ScimError::invalid_filter)?;
        out.filter = Some(f);
        if let Some(Tok::Word(w)) = p.peek() {
            let w = w.clone();
            let Some(sub) = w.strip_prefix('.') else {
                return Err(ScimError::invalid_path(format!("malformed path \"{s}\"")));
            };
            let sd = attr.sub_attr(sub).ok_or_else(|| {
                ScimError::invalid_path(format!("unknown sub-attribute \"{}.{sub}\"", attr.name))
            })?;
            out.sub = Some(sd);
            p.pos += 1;
        }
    }
    if p.peek().is_some() {
        return Err(ScimError::invalid_path(format!("malformed path \"{s}\"")));
    }
    Ok(out)
}

/// Where a filter reads attribute values from.
pub(crate) trait Source {
    /// Value of a top-level attribute (`ext` = its schema), with canonical names.
    fn attr_value(&self, ext: SchemaIdx, attr: &str) -> Option<Cow<'_, Value>>;
}

/// A complex element (inside a value filter) or a bare resource map.
impl Source for Map<String, Value> {
    fn attr_value(&self, ext: SchemaIdx, attr: &str) -> Option<Cow<'_, Value>> {
        if ext.is_some() {
            return None;
        }
        self.get(attr).map(Cow::Borrowed)
    }
}

fn collect<'v>(v: &'v Value, sub: Option<&str>, out: &mut Vec<&'v Value>) {
    match (v, sub) {
        (Value::Array(a), _) => a.iter().for_each(|e| collect(e, sub, out)),
        (Value::Object(o), Some(s)) => {
            if let Some(x) = o.get(s) {
                collect(x, None, out)
            }
        }
        (Value::Null, _) | (_, Some(_)) => {}
        (x, None) => out.push(x),
    }
}

fn is_present(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => a.iter().any(is_present),
        Value::Object(o) => o.values().any(is_present),
        _ => true,
    }
}

fn fold(s: &str, case_exact: bool) -> Cow<'_, str> {
    if case_exact {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.to_lowercase())
    }
}

fn compare_one(t: &Target, op: CmpOp, have: &Value, want: &Value) -> bool {
    use CmpOp::*;
    let ord_ok = |o: Ordering| match op {
        Eq => o == Ordering::Equal,
        Ne => o != Ordering::Equal,
        Gt => o == Ordering::Greater,
        Ge => o != Ordering::Less,
        Lt => o == Ordering::Less,
        Le => o != Ordering::Greater,
        Co | Sw | Ew => false,
    };
    match t.ty {
        AttrType::Boolean => match (have.as_bool(), want.as_bool()) {
            (Some(a), Some(b)) => ord_ok(a.cmp(&b)),
            _ => false,
        },
        AttrType::Integer | AttrType::Decimal => match (have.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a.partial_cmp(&b).is_some_and(ord_ok),
            _ => false,
        },
        AttrType::DateTime if !matches!(op, Co | Sw | Ew) => {
            let parse = |v: &Value| {
                v.as_str()
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            };
            match (parse(have), parse(want)) {
                (Some(a), Some(b)) => ord_ok(a.cmp(&b)),
                _ => false,
            }
        }
        _ => {
            let (Some(a), Some(b)) = (have.as_str(), want.as_str()) else {
                return false;
            };
            let (a, b) = (fold(a, t.case_exact), fold(b, t.case_exact));
            match op {
                Co => a.contains(b.as_ref()),
                Sw => a.starts_with(b.as_ref()),
                Ew => a.ends_with(b.as_ref()),
                _ => ord_ok(a.as_ref().cmp(b.as_ref())),
            }
        }
    }
}

impl Filter {
    pub fn matches(&self, src: &dyn Source) -> bool {
        match self {
            Filter::And(a, b) => a.matches(src) && b.matches(src),
            Filter::Or(a, b) => a.matches(src) || b.matches(src),
            Filter::Not(a) => !a.matches(src),
            Filter::Present(t) => {
                let top = src.attr_value(t.ext, &t.attr);
                let mut vals = Vec::new();
                if let Some(v) = top.as_deref() {
                    collect(v, t.sub.as_deref(), &mut vals);
                }
                vals.into_iter().any(is_present)
            }
            Filter::Cmp { target, op, value } => {
                let top = src.attr_value(target.ext, &target.attr);
                let mut vals = Vec::new();
                if let Some(v) = top.as_deref() {
                    collect(v, target.sub.as_deref(), &mut vals);
                }
                if value.is_null() {
                    // `eq null` ≡ unassigned (RFC 7643 §2.5).
                    return (*op == CmpOp::Eq) == vals.is_empty();
                }
                if *op == CmpOp::Ne {
                    // Multi-valued: "ne" holds when no value equals.
                    return !vals
                        .iter()
                        .any(|v| compare_one(target, CmpOp::Eq, v, value));
                }
                // Multi-valued: matches if any value matches (RFC 7644 §3.4.2.2).
                vals.iter().any(|v| compare_one(target, *op, v, value))
            }
            Filter::ValuePath { ext, attr, inner } => {
                let Some(top) = src.attr_value(*ext, attr) else {
                    return false;
                };
                match top.as_ref() {
                    Value::Array(a) => a
                        .iter()
                        .any(|e| e.as_object().is_some_and(|o| inner.matches(o))),
                    Value::Object(o) => inner.matches(o),
                    _ => false,
                }
            }
        }
    }

    /// Does this element (of a multi-valued complex attribute) match? Used by PATCH paths.
    pub fn matches_element(&self, element: &Value) -> bool {
        element.as_object().is_some_and(|o| self.matches(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reg() -> Registry {
        Registry::new(Some(&(
            "urn:ietf:params:scim:schemas:extension:acme:2.0:User".to_string(),
            vec!["officeLocation".to_string()],
        )))
    }

    fn m(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn parses_and_matches() {
        let r = reg();
        let user = m(json!({
            "userName": "Ada@Example.edu",
            "externalId": "HR-1",
            "active": true,
            "emails": [{"value": "ada@x.edu", "type": "work"}, {"value": "a@home", "type": "home"}],
            "name": {"givenName": "Ada"},
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "Maths"},
        }));
        // Extension attributes live under their URN; emulate the resource source.
        struct S(Map<String, Value>, Registry);
        impl Source for S {
            fn attr_value(&self, ext: SchemaIdx, attr: &str) -> Option<Cow<'_, Value>> {
                match ext {
                    None => self.0.get(attr).map(Cow::Borrowed),
                    Some(i) => self
                        .0
                        .get(&self.1.extensions[i].id)
                        .and_then(|o| o.get(attr))
                        .map(Cow::Borrowed),
                }
            }
        }
        let s = S(user, reg());
        let ok = |f: &str| parse_filter(&r, f).map(|f| f.matches(&s));
        assert_eq!(ok("userName eq \"ada@example.EDU\""), Ok(true));
        assert_eq!(ok("USERNAME Eq \"ada@example.edu\""), Ok(true));
        assert_eq!(ok("externalId eq \"hr-1\""), Ok(false));
        assert_eq!(ok("externalId eq \"HR-1\""), Ok(true));
        assert_eq!(ok("emails[type eq \"work\" and value co \"@X\"]"), Ok(true));
        assert_eq!(ok("emails.value ew \"@home\""), Ok(true));
        assert_eq!(ok("emails co \"home\""), Ok(true));
        assert_eq!(ok("not (active eq true) or title pr"), Ok(false));
        assert_eq!(
            ok("(title pr or name.givenName sw \"a\") and active eq true"),
            Ok(true)
        );
        assert_eq!(
            ok("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department eq \"maths\""),
            Ok(true)
        );
        assert_eq!(ok("title eq null"), Ok(true));
        assert_eq!(ok("title ne \"x\""), Ok(true));
        for bad in [
            "userName eq",
            "userName eq ada",
            "foo eq \"x\"",
            "department eq \"x\"",
            "active gt true",
            "userName eq \"x\" and",
            "(userName eq \"x\"",
            "emails[type eq \"work\"].value eq \"x\"",
            "name eq \"x\"",
            "userName xx \"x\"",
            "userName eq \"unterminated",
            "password eq \"x\"",
            "",
        ] {
            let e = parse_filter(&r, bad).err();
            assert_eq!(
                e.as_ref().and_then(|e| e.scim_type),
                Some("invalidFilter"),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn json_escapes_round_trip() {
        let r = reg();
        let f = parse_filter(&r, r#"userName eq "o\"brien\\x'y""#);
        let Ok(Filter::Cmp { value, .. }) = f else {
            panic!("{f:?}")
        };
        assert_eq!(value, json!("o\"brien\\x'y"));
    }

    #[test]
    fn patch_paths() {
        let r = reg();
        let p = parse_patch_path(&r, "emails[type eq \"work\"].value");
        assert!(p
            .as_ref()
            .is_ok_and(|p| p.filter.is_some() && p.sub.is_some_and(|s| s.name == "value")));
        let p = parse_patch_path(
            &r,
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
        );
        assert!(p
            .as_ref()
            .is_ok_and(|p| p.ext == Some(0) && p.attr.is_some_and(|a| a.name == "manager")));
        let p = parse_patch_path(&r, "urn:ietf:params:scim:schemas:extension:acme:2.0:User");
        assert!(p
            .as_ref()
            .is_ok_and(|p| p.ext == Some(1) && p.attr.is_none()));
        for bad in [
            "",
            "nope",
            "emails[type eq \"work\"]x",
            "name.givenName.x",
            "title[value eq \"x\"]",
        ] {
            let e = parse_patch_path(&r, bad).err();
            assert_eq!(e.and_then(|e| e.scim_type), Some("invalidPath"), "{bad}");
        }
        let e = parse_patch_path(&r, "emails[type eq]").err();
        assert_eq!(e.and_then(|e| e.scim_type), Some("invalidFilter"));
    }
}
