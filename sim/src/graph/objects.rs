//! Directory objects as Graph renders them (users, groups, `$select`), and the reads of one
//! object or relation: a user, a group, a manager, members, `memberOf`, `directReports`,
//! `checkMemberGroups`.

use super::*;

/// A user property's value, borrowed where the state holds it: written straight to JSON by
/// [`UserJson`], or made a `Value` by [`render_user`].
pub(super) enum Prop<'a> {
    Text(&'a str),
    Opt(&'a Option<String>),
    Bool(bool),
    Json(Value),
}

impl serde::Serialize for Prop<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match self {
            Prop::Text(t) => ser.serialize_str(t),
            Prop::Opt(o) => o.serialize(ser),
            Prop::Bool(b) => ser.serialize_bool(*b),
            Prop::Json(v) => v.serialize(ser),
        }
    }
}

impl From<Prop<'_>> for Value {
    fn from(p: Prop<'_>) -> Value {
        match p {
            Prop::Text(t) => Value::String(t.to_string()),
            Prop::Opt(o) => o.as_ref().map_or(Value::Null, |s| Value::String(s.clone())),
            Prop::Bool(b) => Value::Bool(b),
            Prop::Json(v) => v,
        }
    }
}

pub(super) fn user_prop<'a>(u: &'a SimUser, p: &str) -> Option<Prop<'a>> {
    Some(match p {
        "id" => Prop::Text(&u.id),
        "userPrincipalName" => Prop::Text(&u.user_principal_name),
        "mail" => Prop::Opt(&u.mail),
        "givenName" => Prop::Opt(&u.given_name),
        "surname" => Prop::Opt(&u.surname),
        "displayName" => Prop::Opt(&u.display_name),
        "jobTitle" => Prop::Opt(&u.job_title),
        "department" => Prop::Opt(&u.department),
        "officeLocation" => Prop::Opt(&u.office_location),
        "employeeId" => Prop::Opt(&u.employee_id),
        "employeeType" => Prop::Opt(&u.employee_type),
        "companyName" => Prop::Opt(&u.company_name),
        "city" => Prop::Opt(&u.city),
        "country" => Prop::Opt(&u.country),
        "usageLocation" => Prop::Opt(&u.usage_location),
        "mobilePhone" => Prop::Opt(&u.mobile_phone),
        "businessPhones" => Prop::Json(json!(u.business_phones)),
        "accountEnabled" => Prop::Bool(u.account_enabled),
        "onPremisesExtensionAttributes" => {
            let mut m = Map::new();
            for i in 1..=15 {
                m.insert(format!("extensionAttribute{i}"), Value::Null);
            }
            Prop::Json(Value::Object(m))
        }
        "userType" => Prop::Text("Member"),
        "createdDateTime" => Prop::Text(CREATED_AT),
        "otherMails" | "imAddresses" => Prop::Json(json!([])),
        "proxyAddresses" => match &u.mail {
            Some(m) => Prop::Json(json!([format!("SMTP:{m}")])),
            None => Prop::Json(json!([])),
        },
        "mailNickname" => Prop::Text(u.user_principal_name.split('@').next().unwrap_or_default()),
        "onPremisesSyncEnabled" => Prop::Json(Value::Null),
        p if USER_PROPS.contains(&p) => Prop::Json(Value::Null),
        _ => return None,
    })
}

pub(super) fn render_user(u: &SimUser, select: Option<&[&'static str]>, with_type: bool) -> Value {
    let mut m = Map::new();
    if with_type {
        m.insert("@odata.type".into(), json!("#microsoft.graph.user"));
    }
    for p in select.unwrap_or(USER_DEFAULT) {
        if let Some(v) = user_prop(u, p) {
            m.insert((*p).to_string(), Value::from(v));
        }
    }
    Value::Object(m)
}

/// [`render_user`] written straight to JSON (no `Value` per property), optionally with the
/// response's `@odata.context`: the same members, the same values.
pub(super) struct UserJson<'a> {
    pub(super) u: &'a SimUser,
    pub(super) select: Option<&'a [&'static str]>,
    pub(super) with_type: bool,
    pub(super) context: Option<&'a str>,
}

impl serde::Serialize for UserJson<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = ser.serialize_map(None)?;
        if let Some(c) = self.context {
            m.serialize_entry("@odata.context", c)?;
        }
        if self.with_type {
            m.serialize_entry("@odata.type", "#microsoft.graph.user")?;
        }
        for p in self.select.unwrap_or(USER_DEFAULT) {
            if let Some(v) = user_prop(self.u, p) {
                m.serialize_entry(p, &v)?;
            }
        }
        m.end()
    }
}

pub(super) fn mail_nickname(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric()).collect()
}

pub(super) fn group_prop(g: &SimGroup, p: &str) -> Option<Value> {
    Some(match p {
        "id" => json!(g.id),
        "displayName" => json!(g.display_name),
        "mailEnabled" => json!(false),
        "mailNickname" => json!(mail_nickname(&g.display_name)),
        "securityEnabled" => json!(true),
        "groupTypes" => json!([]),
        "createdDateTime" => json!(CREATED_AT),
        p if GROUP_PROPS.contains(&p) => Value::Null,
        _ => return None,
    })
}

pub(super) fn render_group(
    g: &SimGroup,
    select: Option<&[&'static str]>,
    with_type: bool,
) -> Value {
    let mut m = Map::new();
    if with_type {
        m.insert("@odata.type".into(), json!("#microsoft.graph.group"));
    }
    for p in select.unwrap_or(GROUP_DEFAULT) {
        if let Some(v) = group_prop(g, p) {
            m.insert((*p).to_string(), v);
        }
    }
    Value::Object(m)
}

/// With `kind` a key in the entity's own id space: a GUID that is not found is a 404, anything
/// else that is not found is an invalid identifier (as Graph answers for groups).
pub(super) fn group_not_found(ctx: &Ctx, key: &str) -> ApiResponse {
    if uuid::Uuid::parse_str(key).is_ok() {
        not_found(ctx, key)
    } else {
        bad_request(ctx, &format!("Invalid object identifier '{key}'."))
    }
}

pub(super) fn get_group(s: &mut State, base: &str, ctx: &Ctx, key: &str, q: &Query) -> ApiResponse {
    let select = match resolve_select(q, TypeKind::Group) {
        Ok(sel) => sel,
        Err(msg) => return bad_request(ctx, &msg),
    };
    let Some(g) = s.find_group(key) else {
        return group_not_found(ctx, key);
    };
    entity(render_group(g, select.as_deref(), false), base, "groups", q)
}

/// One directory object's 200 answer, with its `@odata.context` in entity set `set`.
fn entity(mut body: Value, base: &str, set: &str, q: &Query) -> ApiResponse {
    if let Value::Object(m) = &mut body {
        m.insert("@odata.context".into(), json!(context(base, set, q, true)));
    }
    ApiResponse::json(200, body)
}

pub(super) fn get_user(s: &mut State, base: &str, ctx: &Ctx, key: &str, q: &Query) -> ApiResponse {
    let select = match resolve_select(q, TypeKind::User) {
        Ok(sel) => sel,
        Err(msg) => return bad_request(ctx, &msg),
    };
    let Some(u) = s.find_user(key) else {
        return not_found(ctx, key);
    };
    entity(render_user(u, select.as_deref(), false), base, "users", q)
}

pub(super) fn get_manager(
    s: &mut State,
    base: &str,
    ctx: &Ctx,
    key: &str,
    q: &Query,
) -> ApiResponse {
    let select = match resolve_select(q, TypeKind::DirectoryObject) {
        Ok(sel) => sel,
        Err(msg) => return bad_request(ctx, &msg),
    };
    let Some(u) = s.find_user(key) else {
        return not_found(ctx, key);
    };
    let Some(m) = u.manager_id.as_deref().and_then(|id| s.users.get(id)) else {
        return not_found(ctx, "manager");
    };
    let context = context(base, "directoryObjects", q, true);
    ApiResponse::rendered(&UserJson {
        u: m,
        select: select.as_deref(),
        with_type: true,
        context: Some(&context),
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn list_members(
    s: &mut State,
    base: &str,
    next_base: &str,
    ctx: &Ctx,
    key: &str,
    transitive: bool,
    cast: Option<&str>,
    q: &Query,
) -> ApiResponse {
    let (kind, set) = match cast {
        None => (Some(TypeKind::DirectoryObject), "directoryObjects"),
        Some("microsoft.graph.user") => (Some(TypeKind::User), "users"),
        Some("microsoft.graph.group") => (Some(TypeKind::Group), "groups"),
        Some(c) if EMPTY_CASTS.contains(&c) => (None, "directoryObjects"),
        Some(c) => {
            return graph_error(
                ctx,
                400,
                "Request_UnsupportedQuery",
                &format!("The type cast '{c}' is not supported for this member collection."),
            )
        }
    };
    let select = match resolve_select(q, kind.unwrap_or(TypeKind::DirectoryObject)) {
        Ok(sel) => sel,
        Err(msg) => return bad_request(ctx, &msg),
    };
    let top = match q.page_size() {
        Ok(t) => t,
        Err(msg) => return bad_request(ctx, &msg),
    };
    let Some(gid) = s.find_group(key).map(|g| g.id.clone()) else {
        return group_not_found(ctx, key);
    };
    let listing_key = format!(
        "{}|{}|{}",
        gid.to_lowercase(),
        if transitive { "transitive" } else { "direct" },
        cast.unwrap_or("")
    );
    let offset = match &q.skiptoken {
        None => 0,
        Some(t) => match decode_skiptoken(t, &listing_key) {
            Some(o) => o,
            None => {
                return graph_error(
                    ctx,
                    400,
                    "Directory_ExpiredPageToken",
                    "The specified page token value has expired and can no longer be included in your request.",
                )
            }
        },
    };
    let exp = s.expansion(&gid);
    let groups_only: Vec<ObjRef>;
    let list: &[ObjRef] = match (kind, transitive) {
        (None, _) => &[],
        (Some(TypeKind::User), true) => &exp.transitive_users,
        (Some(TypeKind::User), false) => &exp.direct_users,
        (Some(TypeKind::Group), t) => {
            let src = if t { &exp.transitive } else { &exp.direct };
            groups_only = src.iter().filter(|r| r.group).cloned().collect();
            &groups_only
        }
        (Some(TypeKind::DirectoryObject), true) => &exp.transitive,
        (Some(TypeKind::DirectoryObject), false) => &exp.direct,
    };
    let start = offset.min(list.len());
    let end = start.saturating_add(top).min(list.len());
    let with_type = kind == Some(TypeKind::DirectoryObject);
    let mut items = Vec::with_capacity(end - start);
    for r in &list[start..end] {
        if r.group {
            if let Some(g) = s.groups.get(&r.id) {
                items.push(Item::Other(render_group(g, select.as_deref(), with_type)));
            }
        } else if let Some(u) = s.users.get(&r.id) {
            items.push(Item::User(UserJson {
                u,
                select: select.as_deref(),
                with_type,
                context: None,
            }));
        }
    }
    let next_link = (end < list.len()).then(|| {
        let token = encode_skiptoken(end, &listing_key);
        let mut query = q.passthrough.join("&");
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str("$skiptoken=");
        query.push_str(&token);
        format!("{next_base}?{query}")
    });
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Item<'a> {
        User(UserJson<'a>),
        Other(Value),
    }
    #[derive(serde::Serialize)]
    struct Page<'a> {
        #[serde(rename = "@odata.context")]
        context: String,
        #[serde(rename = "@odata.nextLink", skip_serializing_if = "Option::is_none")]
        next_link: Option<String>,
        value: Vec<Item<'a>>,
    }
    ApiResponse::rendered(&Page {
        context: context(base, set, q, false),
        next_link,
        value: items,
    })
}

/// What a listing of one user's relation (`memberOf`, `transitiveMemberOf`, `directReports`)
/// has checked before it reads: the collection it names, `$select`, `$top`, the user's id, the
/// key its page tokens are bound to and the page's offset.
pub(super) struct RelationPage {
    pub(super) set: &'static str,
    pub(super) select: Option<Vec<&'static str>>,
    pub(super) top: usize,
    pub(super) uid: String,
    pub(super) listing_key: String,
    pub(super) offset: usize,
}

/// Checks a relation listing's request: no cast or the one `cast_to` (its name, item type and
/// collection), a valid `$select` and `$top`, a live user and a `$skiptoken` of this listing.
/// `Err` is the answer to send.
#[allow(clippy::too_many_arguments)]
pub(super) fn relation_page(
    s: &State,
    ctx: &Ctx,
    key: &str,
    relation: &str,
    cast: Option<&str>,
    cast_to: (&str, TypeKind, &'static str),
    q: &Query,
) -> Result<RelationPage, ApiResponse> {
    let (kind, set) = match cast {
        None => (TypeKind::DirectoryObject, "directoryObjects"),
        Some(c) if c == cast_to.0 => (cast_to.1, cast_to.2),
        Some(c) => {
            return Err(graph_error(
                ctx,
                400,
                "Request_UnsupportedQuery",
                &format!("The type cast '{c}' is not supported for this collection."),
            ))
        }
    };
    let select = resolve_select(q, kind).map_err(|msg| bad_request(ctx, &msg))?;
    let top = q.page_size().map_err(|msg| bad_request(ctx, &msg))?;
    let Some(uid) = s.find_user(key).map(|u| u.id.clone()) else {
        return Err(not_found(ctx, key));
    };
    let listing_key = format!("{}|{relation}|{}", uid.to_lowercase(), cast.unwrap_or(""));
    let offset = match &q.skiptoken {
        None => 0,
        Some(t) => decode_skiptoken(t, &listing_key).ok_or_else(|| {
            graph_error(
                ctx,
                400,
                "Directory_ExpiredPageToken",
                "The specified page token value has expired and can no longer be included in your request.",
            )
        })?,
    };
    Ok(RelationPage {
        set,
        select,
        top,
        uid,
        listing_key,
        offset,
    })
}

impl RelationPage {
    /// The page's items among `len`: from the offset, at most `$top`.
    pub(super) fn range(&self, len: usize) -> (usize, usize) {
        let start = self.offset.min(len);
        (start, start.saturating_add(self.top).min(len))
    }

    /// The `@odata.nextLink` of a page that ends at `end` of `len` items, if more follow.
    pub(super) fn next_link(
        &self,
        q: &Query,
        next_base: &str,
        end: usize,
        len: usize,
    ) -> Option<String> {
        (end < len).then(|| {
            let mut query = q.passthrough.join("&");
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str("$skiptoken=");
            query.push_str(&encode_skiptoken(end, &self.listing_key));
            format!("{next_base}?{query}")
        })
    }
}

/// `GET /users/{id | userPrincipalName}/memberOf` and `/transitiveMemberOf` (optionally cast to
/// `microsoft.graph.group`): the groups the user is a member of, directly or at any depth,
/// ordered by displayName. Without a cast the items carry `@odata.type`, as Graph's
/// directoryObject collections do.
#[allow(clippy::too_many_arguments)]
pub(super) fn list_member_of(
    s: &mut State,
    base: &str,
    next_base: &str,
    ctx: &Ctx,
    key: &str,
    transitive: bool,
    cast: Option<&str>,
    q: &Query,
) -> ApiResponse {
    let relation = if transitive {
        "transitiveMemberOf"
    } else {
        "memberOf"
    };
    let cast_to = ("microsoft.graph.group", TypeKind::Group, "groups");
    let p = match relation_page(s, ctx, key, relation, cast, cast_to, q) {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    let ids = s.groups_of(&p.uid, transitive);
    let (start, end) = p.range(ids.len());
    let items: Vec<Value> = ids[start..end]
        .iter()
        .filter_map(|id| s.groups.get(id))
        .map(|g| render_group(g, p.select.as_deref(), cast.is_none()))
        .collect();
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        json!(context(base, p.set, q, false)),
    );
    if let Some(link) = p.next_link(q, next_base, end, ids.len()) {
        body.insert("@odata.nextLink".into(), json!(link));
    }
    body.insert("value".into(), Value::Array(items));
    ApiResponse::json(200, Value::Object(body))
}

/// `GET /users/{id | userPrincipalName}/directReports` (optionally cast to
/// `microsoft.graph.user`): the live users whose `manager_id` is this user, ordered by id (a
/// soft-deleted report is not listed; the simulated tenant has no org contacts). Without a cast
/// the items carry `@odata.type`, as Graph's directoryObject collections do. A missing or
/// soft-deleted user is a 404.
pub(super) fn list_direct_reports(
    s: &mut State,
    base: &str,
    next_base: &str,
    ctx: &Ctx,
    key: &str,
    cast: Option<&str>,
    q: &Query,
) -> ApiResponse {
    let cast_to = ("microsoft.graph.user", TypeKind::User, "users");
    let p = match relation_page(s, ctx, key, "directReports", cast, cast_to, q) {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    let mut reports: Vec<&SimUser> = s
        .users
        .values()
        .filter(|u| {
            u.manager_id
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(&p.uid))
        })
        .collect();
    reports.sort_by(|a, b| a.id.cmp(&b.id));
    let (start, end) = p.range(reports.len());
    let items: Vec<UserJson<'_>> = reports[start..end]
        .iter()
        .map(|u| UserJson {
            u,
            select: p.select.as_deref(),
            with_type: cast.is_none(),
            context: None,
        })
        .collect();
    let next_link = p.next_link(q, next_base, end, reports.len());
    #[derive(serde::Serialize)]
    struct Page<'a> {
        #[serde(rename = "@odata.context")]
        context: String,
        #[serde(rename = "@odata.nextLink", skip_serializing_if = "Option::is_none")]
        next_link: Option<String>,
        value: Vec<UserJson<'a>>,
    }
    ApiResponse::rendered(&Page {
        context: context(base, p.set, q, false),
        next_link,
        value: items,
    })
}

/// Most group ids `checkMemberGroups` takes in one request.
const CHECK_MEMBER_GROUPS_MAX: usize = 20;

/// `POST /users/{id | userPrincipalName}/checkMemberGroups` with `{"groupIds": [...]}` (at most
/// 20): the subset of those groups the user is a member of, directly or through nested groups.
/// A missing or soft-deleted user is a 404, as on Graph.
pub(super) fn check_member_groups(
    s: &mut State,
    base: &str,
    ctx: &Ctx,
    key: &str,
    payload: Payload<'_>,
) -> ApiResponse {
    let json_body = payload
        .content_type
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json"));
    if !json_body {
        return bad_request(
            ctx,
            "Content-Type 'application/json' is required for a request with a body.",
        );
    }
    let v: Value = match serde_json::from_slice(payload.body) {
        Ok(v) => v,
        Err(_) => return bad_request(ctx, "Invalid JSON in the request body."),
    };
    let Some(ids) = v.get("groupIds").and_then(Value::as_array) else {
        return bad_request(ctx, "The parameter 'groupIds' is missing.");
    };
    let Some(ids) = ids
        .iter()
        .map(|i| i.as_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()
    else {
        return bad_request(ctx, "The parameter 'groupIds' must be an array of strings.");
    };
    if ids.is_empty() || ids.len() > CHECK_MEMBER_GROUPS_MAX {
        return bad_request(
            ctx,
            &format!(
                "The parameter 'groupIds' must hold between 1 and {CHECK_MEMBER_GROUPS_MAX} ids."
            ),
        );
    }
    let Some(uid) = s.find_user(key).map(|u| u.id.clone()) else {
        return not_found(ctx, key);
    };
    let mine: HashSet<String> = s
        .groups_of(&uid, true)
        .into_iter()
        .map(|g| g.to_lowercase())
        .collect();
    let value: Vec<Value> = ids
        .into_iter()
        .filter(|g| mine.contains(&g.to_lowercase()))
        .map(Value::String)
        .collect();
    ApiResponse::json(
        200,
        json!({
            "@odata.context": format!("{base}/v1.0/$metadata#Collection(Edm.String)"),
            "value": value,
        }),
    )
}
