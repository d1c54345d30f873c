//! Mapping from a Graph user (and its manager) to the neutral target record.
//!
//! Owns: the default attribute map, the expression language of `[integration.mapping]`
//! (a property, `manager.<property>`, a quoted literal, `coalesce(a, b, ...)`), the empty-value
//! policy, and which Graph properties must be `$select`ed. Pure: no I/O, and it knows nothing of
//! SCIM JSON (record keys such as `emails.work` are translated by `lms::scim`).

use std::collections::{BTreeMap, BTreeSet};

use crate::graph::models::GraphUser;

// The record vocabulary lives in `model`, where the store and the LMS client read it too.
pub use crate::model::record::{
    is_active, AttrChange, AttrValue, Record, ACTIVE, EXTERNAL_ID, MANAGER, USER_NAME,
};

/// Which Entra property becomes the LMS username.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsernameSource {
    UserPrincipalName,
    Mail,
    EmployeeId,
    Id,
}

impl UsernameSource {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        match s {
            "userPrincipalName" => Ok(Self::UserPrincipalName),
            "mail" => Ok(Self::Mail),
            "employeeId" => Ok(Self::EmployeeId),
            "id" => Ok(Self::Id),
            other => Err(format!(
                "{other:?} is not supported; use \"userPrincipalName\", \"mail\", \"employeeId\" or \"id\""
            )),
        }
    }
    pub(crate) fn graph_property(self) -> &'static str {
        match self {
            Self::UserPrincipalName => "userPrincipalName",
            Self::Mail => "mail",
            Self::EmployeeId => "employeeId",
            Self::Id => "id",
        }
    }
}

/// Graph user properties an expression may name (all `$select`able on /users).
const USER_PROPERTIES: &[&str] = &[
    "id",
    "userPrincipalName",
    "mail",
    "givenName",
    "surname",
    "displayName",
    "jobTitle",
    "department",
    "officeLocation",
    "employeeId",
    "employeeType",
    "companyName",
    "city",
    "country",
    "state",
    "streetAddress",
    "postalCode",
    "usageLocation",
    "mobilePhone",
    "businessPhones",
    "preferredLanguage",
    "accountEnabled",
    "employeeHireDate",
    "onPremisesSamAccountName",
];

/// Properties of the manager an expression may name as `manager.<property>`.
const MANAGER_PROPERTIES: &[&str] = &[
    "id",
    "displayName",
    "mail",
    "userPrincipalName",
    "givenName",
    "surname",
    "jobTitle",
    "employeeId",
];

const CORE_KEYS: &[&str] = &[
    "displayName",
    "nickName",
    "title",
    "userType",
    "preferredLanguage",
    "locale",
    "timezone",
    "profileUrl",
    "name.givenName",
    "name.familyName",
    "name.middleName",
    "name.formatted",
    "name.honorificPrefix",
    "name.honorificSuffix",
    "emails.work",
    "emails.home",
    "emails.other",
    "phoneNumbers.work",
    "phoneNumbers.mobile",
    "phoneNumbers.home",
    "phoneNumbers.fax",
    "phoneNumbers.other",
    "enterprise.employeeNumber",
    "enterprise.costCenter",
    "enterprise.organization",
    "enterprise.division",
    "enterprise.department",
];

/// What happens in the target when the source value is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmptyPolicy {
    /// Remove the attribute in the target (default).
    Clear,
    /// Leave whatever the target has.
    Keep,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// A Graph user property, e.g. `jobTitle` or `onPremisesExtensionAttributes.extensionAttribute1`.
    Prop(String),
    /// A property of the user's manager.
    Manager(String),
    Literal(String),
    Coalesce(Vec<Expr>),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MappingError {
    #[error("{key}: {message}")]
    At { key: String, message: String },
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub key: String,
    pub expr: Expr,
    pub on_empty: EmptyPolicy,
}

/// The compiled mapping of one integration.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub username: UsernameSource,
    pub rules: Vec<Rule>,
    /// Whether `enterprise.manager` is linked to the manager's target id.
    pub link_manager: bool,
}

/// Why a user cannot be mapped (a per-user failure, never a crash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MapFailure(pub String);

/// The desired state of one user, before the manager's target id is resolved.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Desired {
    pub entra_id: String,
    pub user_name: String,
    pub record: Record,
    /// Entra id of the manager, when the user has one (whether or not `enterprise.manager`
    /// is linked: see [`Mapping::link_manager`]).
    pub manager_entra_id: Option<String>,
    /// Keys whose source was empty under the `keep` policy: the target's value stays.
    pub keep: BTreeSet<String>,
}

fn default_rules() -> Vec<(&'static str, &'static str)> {
    vec![
        ("name.givenName", "givenName"),
        ("name.familyName", "surname"),
        ("displayName", "displayName"),
        ("emails.work", "mail"),
        ("title", "jobTitle"),
        ("enterprise.employeeNumber", "employeeId"),
        ("enterprise.department", "department"),
        ("custom.officeLocation", "officeLocation"),
        ("custom.city", "city"),
        ("custom.country", "country"),
        ("custom.managerDisplayName", "manager.displayName"),
        ("custom.managerEmail", "manager.mail"),
    ]
}

fn valid_key(key: &str) -> Result<(), String> {
    if matches!(key, USER_NAME | EXTERNAL_ID | ACTIVE) {
        return Err(format!(
            "{key} is set by rostersync itself (userName by `username`, externalId = Entra object id, active from membership and accountEnabled)"
        ));
    }
    if CORE_KEYS.contains(&key) {
        return Ok(());
    }
    if let Some(name) = key.strip_prefix("custom.") {
        let mut chars = name.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            return Ok(());
        }
        return Err(format!("{name:?} is not a valid SCIM attribute name"));
    }
    Err(format!(
        "unknown target attribute; use one of {}, enterprise.manager (= false to disable) or custom.<name>",
        CORE_KEYS.join(", ")
    ))
}

/// Parses an expression of the mapping language.
pub(crate) fn parse_expr(src: &str) -> Result<Expr, String> {
    let mut p = Parser {
        s: src.as_bytes(),
        i: 0,
    };
    let e = p.expr()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!(
            "unexpected {:?} at column {} of {src:?}",
            &src[p.i..],
            p.i + 1
        ));
    }
    Ok(e)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn expr(&mut self) -> Result<Expr, String> {
        self.ws();
        match self.s.get(self.i) {
            None => Err("empty expression".into()),
            Some(&q @ (b'"' | b'\'')) => {
                let start = self.i + 1;
                let end = self.s[start..]
                    .iter()
                    .position(|&c| c == q)
                    .ok_or("unterminated quoted literal")?;
                self.i = start + end + 1;
                let lit = std::str::from_utf8(&self.s[start..start + end])
                    .map_err(|_| "literal is not UTF-8")?;
                Ok(Expr::Literal(lit.to_string()))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_alphanumeric() || self.s[self.i] == b'.')
                {
                    self.i += 1;
                }
                let ident = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| "not UTF-8")?;
                self.ws();
                if ident == "coalesce" && self.s.get(self.i) == Some(&b'(') {
                    self.i += 1;
                    let mut args = vec![self.expr()?];
                    loop {
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => {
                                self.i += 1;
                                args.push(self.expr()?);
                            }
                            Some(b')') => {
                                self.i += 1;
                                break;
                            }
                            _ => return Err("coalesce( needs a closing ')'".into()),
                        }
                    }
                    return Ok(Expr::Coalesce(args));
                }
                if let Some(p) = ident.strip_prefix("manager.") {
                    if !MANAGER_PROPERTIES.contains(&p) {
                        return Err(format!(
                            "manager.{p} is not supported; use manager.{}",
                            MANAGER_PROPERTIES.join(", manager.")
                        ));
                    }
                    return Ok(Expr::Manager(p.to_string()));
                }
                if let Some(n) =
                    ident.strip_prefix("onPremisesExtensionAttributes.extensionAttribute")
                {
                    if n.parse::<u8>().is_ok_and(|n| (1..=15).contains(&n)) {
                        return Ok(Expr::Prop(ident.to_string()));
                    }
                }
                if USER_PROPERTIES.contains(&ident) {
                    return Ok(Expr::Prop(ident.to_string()));
                }
                Err(format!(
                    "{ident:?} is not a Graph user property rostersync reads; use one of {}, onPremisesExtensionAttributes.extensionAttribute1..15, manager.<property>, a quoted literal or coalesce(...)",
                    USER_PROPERTIES.join(", ")
                ))
            }
            Some(_) => Err(format!(
                "cannot parse expression {:?}",
                String::from_utf8_lossy(self.s)
            )),
        }
    }
}

/// Flattens nested TOML tables (`name.givenName = "x"` parses as a table) into dotted keys.
fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) if !t.contains_key("from") && !t.contains_key("on_empty") => {
                flatten(&key, t, out)
            }
            other => out.push((key, other.clone())),
        }
    }
}

impl Mapping {
    /// Builds the mapping: defaults, then each configured entry overrides or adds a rule.
    /// An entry is an expression string, `{ from = "expr", on_empty = "clear"|"keep" }`, or
    /// `false` to drop a default.
    pub(crate) fn build(
        username: UsernameSource,
        table: Option<&toml::Table>,
    ) -> Result<Self, MappingError> {
        let mut rules: BTreeMap<String, Rule> = default_rules()
            .into_iter()
            .map(|(k, e)| {
                let expr = parse_expr(e).expect("default mapping expressions parse");
                (
                    k.to_string(),
                    Rule {
                        key: k.to_string(),
                        expr,
                        on_empty: EmptyPolicy::Clear,
                    },
                )
            })
            .collect();
        let mut link_manager = true;
        let mut entries = Vec::new();
        if let Some(t) = table {
            flatten("", t, &mut entries);
        }
        for (key, value) in entries {
            let at = |message: String| MappingError::At {
                key: key.clone(),
                message,
            };
            if key == MANAGER {
                match value {
                    toml::Value::Boolean(b) => link_manager = b,
                    _ => return Err(at("enterprise.manager is linked automatically; only `false` (to disable) is accepted".into())),
                }
                continue;
            }
            valid_key(&key).map_err(at)?;
            let (expr, on_empty) = match &value {
                toml::Value::Boolean(false) => {
                    rules.remove(&key);
                    continue;
                }
                toml::Value::String(s) => (s.clone(), EmptyPolicy::Clear),
                toml::Value::Table(t) => {
                    for k in t.keys() {
                        if k != "from" && k != "on_empty" {
                            return Err(at(format!("unknown option {k:?}; use `from` and `on_empty`")));
                        }
                    }
                    let from = match t.get("from") {
                        Some(toml::Value::String(s)) => s.clone(),
                        Some(_) => return Err(at("`from` must be an expression string".into())),
                        // `{ on_empty = "keep" }` alone changes the policy of the default rule.
                        None => match rules.get(&key) {
                            Some(r) => expr_source(&r.expr),
                            None => return Err(at("`from` is missing".into())),
                        },
                    };
                    let policy = match t.get("on_empty").map(|v| v.as_str()) {
                        None | Some(Some("clear")) => EmptyPolicy::Clear,
                        Some(Some("keep")) => EmptyPolicy::Keep,
                        _ => return Err(at("on_empty must be \"clear\" or \"keep\"".into())),
                    };
                    (from, policy)
                }
                other => {
                    return Err(at(format!(
                        "expected an expression string, a table {{ from = ..., on_empty = ... }} or false, got {other}"
                    )))
                }
            };
            let expr = parse_expr(&expr).map_err(at)?;
            rules.insert(
                key.clone(),
                Rule {
                    key: key.clone(),
                    expr,
                    on_empty,
                },
            );
        }
        Ok(Mapping {
            username,
            rules: rules.into_values().collect(),
            link_manager,
        })
    }

    /// Graph properties to `$select` when listing users.
    pub fn user_select(&self) -> Vec<String> {
        let mut set: BTreeSet<String> =
            ["id", "userPrincipalName", "accountEnabled", "displayName"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        set.insert(self.username.graph_property().to_string());
        for r in &self.rules {
            collect_props(&r.expr, &mut set, false);
        }
        set.into_iter()
            .map(|p| match p.split_once('.') {
                Some((root, _)) => root.to_string(),
                None => p,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Manager properties to `$select`, or `None` when no manager data is needed.
    pub(crate) fn manager_select(&self) -> Option<Vec<String>> {
        let mut set = BTreeSet::new();
        for r in &self.rules {
            collect_props(&r.expr, &mut set, true);
        }
        if set.is_empty() && !self.link_manager {
            return None;
        }
        set.insert("id".to_string());
        Some(set.into_iter().collect())
    }

    /// Maps one Graph user. `manager` is the manager's Graph object when there is one.
    pub(crate) fn apply(
        &self,
        user: &GraphUser,
        manager: Option<&GraphUser>,
    ) -> Result<Desired, MapFailure> {
        let uprop = self.username.graph_property();
        let user_name = user.string(uprop).ok_or_else(|| {
            MapFailure(format!(
                "has no {uprop}, which is configured as the LMS username (username = \"{uprop}\")"
            ))
        })?;
        let mut record = Record::new();
        let mut keep = BTreeSet::new();
        record.insert(USER_NAME.into(), AttrValue::Str(user_name.clone()));
        record.insert(EXTERNAL_ID.into(), AttrValue::Str(user.id.clone()));
        // Membership is decided by the caller; accountEnabled=false deactivates.
        let enabled = user
            .props
            .get("accountEnabled")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        record.insert(ACTIVE.into(), AttrValue::Bool(enabled));
        for r in &self.rules {
            match eval(&r.expr, user, manager) {
                Some(v) => {
                    record.insert(r.key.clone(), AttrValue::Str(v));
                }
                None if r.on_empty == EmptyPolicy::Keep => {
                    keep.insert(r.key.clone());
                }
                None => {}
            }
        }
        Ok(Desired {
            entra_id: user.id.clone(),
            user_name,
            record,
            // Known whenever the manager was read (also without `manager.value`): the index
            // finds a manager's reports by it.
            manager_entra_id: manager.map(|m| m.id.clone()),
            keep,
        })
    }
}

fn expr_source(e: &Expr) -> String {
    match e {
        Expr::Prop(p) => p.clone(),
        Expr::Manager(p) => format!("manager.{p}"),
        Expr::Literal(l) => format!("{l:?}"),
        Expr::Coalesce(a) => format!(
            "coalesce({})",
            a.iter().map(expr_source).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn collect_props(e: &Expr, out: &mut BTreeSet<String>, manager: bool) {
    match e {
        Expr::Prop(p) if !manager => {
            out.insert(p.clone());
        }
        Expr::Manager(p) if manager => {
            out.insert(p.clone());
        }
        Expr::Coalesce(a) => a.iter().for_each(|e| collect_props(e, out, manager)),
        _ => {}
    }
}

fn eval(e: &Expr, user: &GraphUser, manager: Option<&GraphUser>) -> Option<String> {
    match e {
        Expr::Prop(p) => user.string(p),
        Expr::Manager(p) => manager.and_then(|m| m.string(p)),
        Expr::Literal(l) => (!l.is_empty()).then(|| l.clone()),
        Expr::Coalesce(a) => a.iter().find_map(|e| eval(e, user, manager)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(v: serde_json::Value) -> GraphUser {
        GraphUser::from_value(v).unwrap()
    }

    #[test]
    fn attr_values_round_trip_and_reject_other_json() {
        let r: Record = [
            ("a".to_string(), AttrValue::Str("true".into())),
            ("b".to_string(), AttrValue::Bool(false)),
            ("c".to_string(), AttrValue::Str("Zoë \"quoted\"".into())),
        ]
        .into_iter()
        .collect();
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"a":"true","b":false,"c":"Zoë \"quoted\""}"#);
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
        for bad in [r#"{"a":1}"#, r#"{"a":null}"#, r#"{"a":["x"]}"#] {
            assert!(serde_json::from_str::<Record>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_map_the_usual_fields() {
        let m = Mapping::build(UsernameSource::UserPrincipalName, None).unwrap();
        let u = user(
            json!({"id":"u1","userPrincipalName":"ada@x.com","mail":"ada@x.com","givenName":"Ada",
            "surname":"Lovelace","displayName":"Ada Lovelace","jobTitle":"Engineer","department":"R&D",
            "employeeId":"007","officeLocation":"B1","accountEnabled":true}),
        );
        let mgr = user(json!({"id":"m1","displayName":"Boss","mail":"boss@x.com"}));
        let d = m.apply(&u, Some(&mgr)).unwrap();
        assert_eq!(d.user_name, "ada@x.com");
        assert_eq!(d.record["externalId"], AttrValue::Str("u1".into()));
        assert_eq!(d.record["title"], AttrValue::Str("Engineer".into()));
        assert_eq!(
            d.record["enterprise.employeeNumber"],
            AttrValue::Str("007".into())
        );
        assert_eq!(
            d.record["custom.managerEmail"],
            AttrValue::Str("boss@x.com".into())
        );
        assert_eq!(
            d.record["custom.managerDisplayName"],
            AttrValue::Str("Boss".into())
        );
        assert_eq!(d.record["active"], AttrValue::Bool(true));
        assert_eq!(d.manager_entra_id.as_deref(), Some("m1"));
        assert!(!d.record.contains_key("custom.city"));
    }

    #[test]
    fn missing_username_attribute_is_a_per_user_failure() {
        let m = Mapping::build(UsernameSource::Mail, None).unwrap();
        let e = m
            .apply(&user(json!({"id":"u1","userPrincipalName":"a@x"})), None)
            .unwrap_err();
        assert!(e.0.contains("has no mail"), "{e:?}");
        for (src, want) in [
            (UsernameSource::UserPrincipalName, "a@x"),
            (UsernameSource::EmployeeId, "E1"),
            (UsernameSource::Id, "u1"),
        ] {
            let m = Mapping::build(src, None).unwrap();
            let d = m
                .apply(
                    &user(json!({"id":"u1","userPrincipalName":"a@x","employeeId":"E1"})),
                    None,
                )
                .unwrap();
            assert_eq!(d.user_name, want);
        }
    }

    #[test]
    fn configured_entries_override_add_and_drop() {
        let t: toml::Table = toml::from_str(
            r#"
title = "coalesce(jobTitle, employeeType, 'Staff')"
"custom.costCentre" = "onPremisesExtensionAttributes.extensionAttribute3"
enterprise.department = { on_empty = "keep" }
custom.city = false
"#,
        )
        .unwrap();
        let m = Mapping::build(UsernameSource::UserPrincipalName, Some(&t)).unwrap();
        let u = user(json!({"id":"u1","userPrincipalName":"a@x","city":"Oslo",
            "onPremisesExtensionAttributes":{"extensionAttribute3":"CC-9"}}));
        let d = m.apply(&u, None).unwrap();
        assert_eq!(d.record["title"], AttrValue::Str("Staff".into()));
        assert_eq!(d.record["custom.costCentre"], AttrValue::Str("CC-9".into()));
        assert!(!d.record.contains_key("custom.city"));
        assert!(d.keep.contains("enterprise.department"));
        let sel = m.user_select();
        assert!(sel.contains(&"onPremisesExtensionAttributes".to_string()));
        assert!(sel.contains(&"employeeType".to_string()));
        assert!(!sel.contains(&"city".to_string()));
    }

    #[test]
    fn bad_entries_are_rejected_with_reasons() {
        for (src, needle) in [
            ("title = \"jobTitel\"", "jobTitel"),
            ("title = \"coalesce(jobTitle\"", "closing"),
            ("userName = \"mail\"", "set by rostersync"),
            ("favouriteColour = \"mail\"", "unknown target attribute"),
            ("title = \"manager.salary\"", "manager.salary"),
            ("title = 5", "expected an expression"),
            (
                "title = { from = \"jobTitle\", on_empty = \"maybe\" }",
                "on_empty",
            ),
        ] {
            let t: toml::Table = toml::from_str(src).unwrap();
            let e = Mapping::build(UsernameSource::Id, Some(&t))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{src}: {e}");
        }
    }

    #[test]
    fn manager_select_follows_the_mapping() {
        let m = Mapping::build(UsernameSource::Id, None).unwrap();
        assert_eq!(
            m.manager_select().unwrap(),
            vec!["displayName", "id", "mail"]
        );
        let t: toml::Table = toml::from_str(
            "enterprise.manager = false\ncustom.managerEmail = false\ncustom.managerDisplayName = false",
        )
        .unwrap();
        let m = Mapping::build(UsernameSource::Id, Some(&t)).unwrap();
        assert_eq!(m.manager_select(), None);
    }
}
