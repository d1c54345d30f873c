//! Change-notification subscriptions: create, list, renew (which also reauthorizes), delete
//! (docs/graph.md, Subscriptions).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::{GraphClient, GraphError};
use crate::text::urlencode;

/// The subscription resource for property changes of all users.
pub(crate) const USERS_RESOURCE: &str = "/users";

/// The subscription resource for membership changes of one group.
pub(crate) fn group_members_resource(group_id: &str) -> String {
    format!("/groups/{group_id}/members")
}

/// A subscription as Graph describes it (clientState is never read back).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Subscription {
    pub id: String,
    pub resource: String,
    pub change_type: String,
    pub notification_url: String,
    pub lifecycle_url: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// What to create.
pub(crate) struct NewSubscription<'a> {
    pub resource: &'a str,
    pub change_type: &'a str,
    pub notification_url: &'a str,
    pub lifecycle_url: &'a str,
    pub expires_at: DateTime<Utc>,
    pub client_state: &'a str,
}

/// The answer to a create.
#[derive(Debug)]
pub(crate) enum Created {
    New(Subscription),
    /// Graph already has a subscription for this resource and change type (409); its id when
    /// the message names it.
    Duplicate(Option<String>),
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse(v: &Value) -> Result<Subscription, GraphError> {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let bad = |m: &str| GraphError::Decode {
        what: "Graph subscription".into(),
        message: m.to_string(),
    };
    let id = s("id").ok_or_else(|| bad("no id"))?;
    let expires = s("expirationDateTime").ok_or_else(|| bad("no expirationDateTime"))?;
    let expires_at = DateTime::parse_from_rfc3339(&expires)
        .map_err(|e| bad(&format!("expirationDateTime {expires:?}: {e}")))?
        .with_timezone(&Utc);
    Ok(Subscription {
        id,
        resource: s("resource").unwrap_or_default(),
        change_type: s("changeType").unwrap_or_default(),
        notification_url: s("notificationUrl").unwrap_or_default(),
        lifecycle_url: s("lifecycleNotificationUrl"),
        expires_at,
    })
}

/// The subscription id in Graph's 409 message ("Subscription Id <id> already exists ...").
pub(crate) fn duplicate_id(message: &str) -> Option<String> {
    message
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find(|w| w.len() == 36 && w.matches('-').count() == 4)
        .map(str::to_string)
}

impl GraphClient {
    pub(crate) async fn create_subscription(
        &self,
        n: &NewSubscription<'_>,
    ) -> Result<Created, GraphError> {
        let url = format!("{}/subscriptions", self.api_root);
        let body = json!({
            "changeType": n.change_type,
            "notificationUrl": n.notification_url,
            "lifecycleNotificationUrl": n.lifecycle_url,
            "resource": n.resource,
            "expirationDateTime": iso(n.expires_at),
            "clientState": n.client_state,
            "latestSupportedTlsVersion": "v1_2",
        });
        let (status, resp) = self.send("POST", &url, Some(&body)).await?;
        match status {
            200 | 201 => {
                let v: Value = serde_json::from_slice(&resp).map_err(|e| GraphError::Decode {
                    what: "Graph subscription".into(),
                    message: e.to_string(),
                })?;
                Ok(Created::New(parse(&v)?))
            }
            409 => {
                let e = self.api_error("POST", &url, status, &resp);
                let id = match &e {
                    GraphError::Api { message, .. } => duplicate_id(message),
                    _ => None,
                };
                Ok(Created::Duplicate(id))
            }
            _ => Err(self.api_error("POST", &url, status, &resp)),
        }
    }

    /// Every subscription this app owns in the tenant (follows nextLinks).
    pub(crate) async fn list_subscriptions(&self) -> Result<Vec<Subscription>, GraphError> {
        let mut out = Vec::new();
        let mut next = Some(format!("{}/subscriptions", self.api_root));
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            if pages > 100 || !url.starts_with(&self.api_root) {
                return Err(GraphError::Decode {
                    what: "Graph subscription list".into(),
                    message: "paging does not end or leaves the Graph root".into(),
                });
            }
            let v = self.get_json(&url).await?;
            if let Some(items) = v.get("value").and_then(|x| x.as_array()) {
                for it in items {
                    out.push(parse(it)?);
                }
            }
            next = v
                .get("@odata.nextLink")
                .and_then(|x| x.as_str())
                .map(str::to_string);
        }
        Ok(out)
    }

    /// Extends a subscription (which also reauthorizes it). `None`: it no longer exists.
    pub(crate) async fn renew_subscription(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<Option<Subscription>, GraphError> {
        let url = format!("{}/subscriptions/{}", self.api_root, urlencode(id));
        let body = json!({ "expirationDateTime": iso(expires_at) });
        let (status, resp) = self.send("PATCH", &url, Some(&body)).await?;
        match status {
            200 => {
                let v: Value = serde_json::from_slice(&resp).map_err(|e| GraphError::Decode {
                    what: "Graph subscription".into(),
                    message: e.to_string(),
                })?;
                Ok(Some(parse(&v)?))
            }
            // Some servers answer 204 to a PATCH; the expiry is what we asked for.
            204 => Ok(Some(Subscription {
                id: id.to_string(),
                resource: String::new(),
                change_type: String::new(),
                notification_url: String::new(),
                lifecycle_url: None,
                expires_at,
            })),
            404 => Ok(None),
            _ => Err(self.api_error("PATCH", &url, status, &resp)),
        }
    }

    /// `false`: it did not exist.
    pub(crate) async fn delete_subscription(&self, id: &str) -> Result<bool, GraphError> {
        let url = format!("{}/subscriptions/{}", self.api_root, urlencode(id));
        let (status, resp) = self.send("DELETE", &url, None).await?;
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(self.api_error("DELETE", &url, status, &resp)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_id_in_a_409_message() {
        assert_eq!(
            duplicate_id("Subscription Id 7f105c7d-2dc5-4530-97cd-4e7ae6534c07 already exists for the requested combination"),
            Some("7f105c7d-2dc5-4530-97cd-4e7ae6534c07".into())
        );
        assert_eq!(duplicate_id("already exists"), None);
        assert_eq!(
            parse(&json!({"id": "a", "expirationDateTime": "2026-01-28T11:00:00.0000000Z"}))
                .unwrap()
                .expires_at
                .to_rfc3339(),
            "2026-01-28T11:00:00+00:00"
        );
        assert!(parse(&json!({"id": "a", "expirationDateTime": "tomorrow"})).is_err());
    }
}
