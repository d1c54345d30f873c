//! Group membership delta (docs/graph.md, Delta queries): `members@delta` of one group, page by page,
//! ending in a deltaLink that the next round starts from.

use serde_json::Value;

use super::{GraphClient, GraphError};
use crate::model::MemberKind;
use crate::text::urlencode;

/// One membership change of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MemberChange {
    pub member_id: String,
    pub kind: MemberKind,
    pub removed: bool,
}

/// The result of following a delta round to its end.
#[derive(Debug)]
pub(crate) enum DeltaRound {
    /// Changes in the order Graph gave them (later entries win) and the link for next time.
    Changes {
        changes: Vec<MemberChange>,
        /// True when the group object itself was reported removed (deleted).
        group_removed: bool,
        delta_link: String,
    },
    /// The delta link expired or is unknown (410 Gone, `syncStateNotFound`, ...): start over
    /// with a full sync.
    Expired(String),
}

/// Pages of one round; a hostile peer must not keep us paging forever.
const MAX_PAGES: usize = 100_000;

fn kind_of(t: Option<&str>) -> MemberKind {
    match t.map(|s| s.to_ascii_lowercase()) {
        Some(s) if s == "#microsoft.graph.user" => MemberKind::User,
        Some(s) if s == "#microsoft.graph.group" => MemberKind::Group,
        // Graph always types members in delta; an untyped one is treated as a user so that
        // the worker re-reads it (a non-user id simply reads as "not a user").
        None => MemberKind::User,
        Some(_) => MemberKind::Other,
    }
}

impl GraphClient {
    /// A group's direct members (users, groups and other objects), read page by page: what a
    /// fresh delta round would tell, for rebuilding the membership mirror.
    pub(crate) async fn direct_members(
        &self,
        group_id: &str,
    ) -> Result<Vec<(String, MemberKind)>, GraphError> {
        let mut out = Vec::new();
        let mut next = Some(format!(
            "{}/groups/{}/members?$select=id&$top=999",
            self.api_root,
            urlencode(group_id)
        ));
        let mut pages = 0usize;
        while let Some(url) = next.take() {
            pages += 1;
            if !url.starts_with(&self.api_root) || pages > MAX_PAGES {
                return Err(GraphError::Decode {
                    what: "Graph group members".into(),
                    message: format!(
                        "refusing to follow a nextLink outside {} or beyond {MAX_PAGES} pages",
                        self.api_root
                    ),
                });
            }
            let v = match self.get_json(&url).await {
                Err(e) if e.status() == Some(404) => {
                    return Err(GraphError::GroupNotFound(group_id.to_string()))
                }
                r => r?,
            };
            next = match v.get("@odata.nextLink").and_then(|x| x.as_str()) {
                Some(n) if n == url => {
                    return Err(GraphError::Decode {
                        what: "Graph group members".into(),
                        message: "a page links to itself".into(),
                    })
                }
                Some(n) => Some(n.to_string()),
                None => None,
            };
            let items =
                v.get("value")
                    .and_then(|x| x.as_array())
                    .ok_or_else(|| GraphError::Decode {
                        what: "Graph group members".into(),
                        message: "the page has no `value` array".into(),
                    })?;
            for m in items {
                if let Some(id) = m.get("id").and_then(|x| x.as_str()) {
                    out.push((
                        id.to_string(),
                        kind_of(m.get("@odata.type").and_then(|x| x.as_str())),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The first URL of a fresh round for one group (returns its current direct members).
    pub(crate) fn group_delta_url(&self, group_id: &str) -> String {
        format!(
            "{}/groups/delta?$filter={}&$select=id,displayName,members",
            self.api_root,
            urlencode(&format!("id eq '{group_id}'"))
        )
    }

    /// Follows a round from `start` (a fresh URL or a stored deltaLink) to its deltaLink.
    pub(crate) async fn group_delta(
        &self,
        group_id: &str,
        start: &str,
    ) -> Result<DeltaRound, GraphError> {
        let mut changes = Vec::new();
        let mut group_removed = false;
        let mut next = start.to_string();
        for _ in 0..MAX_PAGES {
            if !next.starts_with(&self.api_root) {
                return Err(GraphError::Decode {
                    what: "Graph group delta".into(),
                    message: format!("refusing to follow a link outside {}", self.api_root),
                });
            }
            let (status, _headers, body) = self.send_raw("GET", &next, None).await?;
            if status == 410 {
                return Ok(DeltaRound::Expired("410 Gone".into()));
            }
            if !(200..300).contains(&status) {
                let e = self.api_error("GET", &next, status, &body);
                if let GraphError::Api { code, .. } = &e {
                    let c = code.to_ascii_lowercase();
                    if c.contains("syncstatenotfound") || c.contains("resyncrequired") {
                        return Ok(DeltaRound::Expired(code.clone()));
                    }
                }
                return Err(e);
            }
            let v: Value = serde_json::from_slice(&body).map_err(|e| GraphError::Decode {
                what: "Graph group delta".into(),
                message: e.to_string(),
            })?;
            let items =
                v.get("value")
                    .and_then(|x| x.as_array())
                    .ok_or_else(|| GraphError::Decode {
                        what: "Graph group delta".into(),
                        message: "the page has no `value` array".into(),
                    })?;
            for g in items {
                // A round for one group should only name that group; ignore others.
                let gid = g.get("id").and_then(|x| x.as_str()).unwrap_or("");
                if !gid.eq_ignore_ascii_case(group_id) {
                    continue;
                }
                if g.get("@removed").is_some() {
                    group_removed = true;
                }
                let Some(members) = g.get("members@delta").and_then(|x| x.as_array()) else {
                    continue;
                };
                for m in members {
                    let Some(id) = m.get("id").and_then(|x| x.as_str()) else {
                        continue;
                    };
                    changes.push(MemberChange {
                        member_id: id.to_string(),
                        kind: kind_of(m.get("@odata.type").and_then(|x| x.as_str())),
                        // Lenient: `@removed` is an object in delta and a string in some
                        // notifications; any presence means removed.
                        removed: m.get("@removed").is_some_and(|r| !r.is_null()),
                    });
                }
            }
            let link = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            match (link("@odata.nextLink"), link("@odata.deltaLink")) {
                (Some(n), _) => next = n,
                (None, Some(d)) => {
                    return Ok(DeltaRound::Changes {
                        changes,
                        group_removed,
                        delta_link: d,
                    })
                }
                (None, None) => {
                    return Err(GraphError::Decode {
                        what: "Graph group delta".into(),
                        message: "a page has neither @odata.nextLink nor @odata.deltaLink".into(),
                    })
                }
            }
        }
        Err(GraphError::Decode {
            what: "Graph group delta".into(),
            message: format!("more than {MAX_PAGES} pages in one round"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_types_are_read_case_insensitively() {
        assert_eq!(kind_of(Some("#Microsoft.Graph.User")), MemberKind::User);
        assert_eq!(kind_of(Some("#microsoft.graph.group")), MemberKind::Group);
        assert_eq!(kind_of(Some("#microsoft.graph.device")), MemberKind::Other);
        assert_eq!(kind_of(None), MemberKind::User);
    }
}

/// One user of a users delta round.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct UserChange {
    pub id: String,
    /// `Some(reason)` when the user was removed (`changed`: soft-deleted; `deleted`: gone).
    pub removed: Option<String>,
    /// The manager as the round tells it: `None` untold, `Some(None)` removed, `Some(Some(id))`
    /// set to that user.
    pub manager: Option<Option<String>>,
    /// The selected properties the round carries (`@odata` annotations and `manager@delta`
    /// left out).
    pub props: serde_json::Map<String, Value>,
}

/// The result of following a users delta round to its end.
#[derive(Debug)]
pub(crate) enum UsersRound {
    Changes {
        users: Vec<UserChange>,
        delta_link: String,
    },
    /// The link expired (410, `syncStateNotFound`): start again.
    Expired(String),
}

impl GraphClient {
    /// The first URL of a users delta round that tracks `select` and the manager.
    pub(crate) fn users_delta_url(&self, select: &[String]) -> String {
        let mut sel: Vec<&str> = select.iter().map(String::as_str).collect();
        if !sel.contains(&"manager") {
            sel.push("manager");
        }
        format!("{}/users/delta?$select={}", self.api_root, sel.join(","))
    }

    /// A users delta link for "now" (`$deltatoken=latest`): what changes after this instant.
    pub(crate) async fn users_delta_latest(&self, select: &[String]) -> Result<String, GraphError> {
        let url = format!("{}&$deltatoken=latest", self.users_delta_url(select));
        match self.users_delta(&url).await? {
            UsersRound::Changes { delta_link, .. } => Ok(delta_link),
            UsersRound::Expired(why) => Err(GraphError::Decode {
                what: "Graph users delta".into(),
                message: format!("a fresh `latest` round was refused: {why}"),
            }),
        }
    }

    /// Follows a users delta round from `start` (a fresh URL or a stored deltaLink).
    pub(crate) async fn users_delta(&self, start: &str) -> Result<UsersRound, GraphError> {
        let mut users = Vec::new();
        let mut next = start.to_string();
        let decode = |m: String| GraphError::Decode {
            what: "Graph users delta".into(),
            message: m,
        };
        for _ in 0..MAX_PAGES {
            if !next.starts_with(&self.api_root) {
                return Err(decode(format!(
                    "refusing to follow a link outside {}",
                    self.api_root
                )));
            }
            let (status, _headers, body) = self.send_raw("GET", &next, None).await?;
            if status == 410 {
                return Ok(UsersRound::Expired("410 Gone".into()));
            }
            if !(200..300).contains(&status) {
                let e = self.api_error("GET", &next, status, &body);
                if let GraphError::Api { code, .. } = &e {
                    let c = code.to_ascii_lowercase();
                    if c.contains("syncstatenotfound") || c.contains("resyncrequired") {
                        return Ok(UsersRound::Expired(code.clone()));
                    }
                }
                return Err(e);
            }
            let mut v: Value = serde_json::from_slice(&body).map_err(|e| decode(e.to_string()))?;
            let items = match v.get_mut("value").map(Value::take) {
                Some(Value::Array(a)) => a,
                _ => return Err(decode("the page has no `value` array".into())),
            };
            for item in items {
                let Value::Object(mut m) = item else { continue };
                let Some(id) = m
                    .get("id")
                    .and_then(|x| x.as_str())
                    .filter(|s| !s.is_empty() && s.len() <= 128)
                    .map(str::to_string)
                else {
                    continue;
                };
                let removed = m.remove("@removed").map(|r| {
                    r.get("reason")
                        .and_then(|x| x.as_str())
                        .unwrap_or("deleted")
                        .to_string()
                });
                let manager = m.remove("manager@delta").map(|d| {
                    let entries: Vec<&Value> = match &d {
                        Value::Array(a) => a.iter().collect(),
                        Value::Object(_) => vec![&d],
                        _ => Vec::new(),
                    };
                    // The last entry wins; a removal entry names the old manager.
                    entries.last().and_then(|e| {
                        if e.get("@removed").is_some_and(|r| !r.is_null()) {
                            None
                        } else {
                            e.get("id").and_then(|x| x.as_str()).map(str::to_string)
                        }
                    })
                });
                m.retain(|k, _| !k.starts_with('@') && !k.contains("@odata") && k != "manager");
                users.push(UserChange {
                    id,
                    removed,
                    manager,
                    props: m,
                });
            }
            let link = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            match (link("@odata.nextLink"), link("@odata.deltaLink")) {
                (Some(n), _) => next = n,
                (None, Some(d)) => {
                    return Ok(UsersRound::Changes {
                        users,
                        delta_link: d,
                    })
                }
                (None, None) => {
                    return Err(decode(
                        "a page has neither @odata.nextLink nor @odata.deltaLink".into(),
                    ))
                }
            }
        }
        Err(decode(format!("more than {MAX_PAGES} pages in one round")))
    }
}
