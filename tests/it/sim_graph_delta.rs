//! Wire-level tests of the Graph simulator's user delta query, `GET /v1.0/users/delta`
//! (`rostersync_sim::graph`), as Microsoft documents it ("user: delta", "Get incremental changes
//! for users"): `$select` with `manager` (`manager@delta`), `$filter` by id, paging, later rounds,
//! soft and hard deletes, restores, `Prefer: return=minimal`, `$deltatoken=latest`, expiry.

use std::collections::{HashMap, HashSet};

use rostersync_sim::graph::{fixture, Fixture, GraphSim, SimUser};
use serde_json::{json, Value};

const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
const SELECT: &str = "id,displayName,jobTitle,mail,accountEnabled,manager";

struct Env {
    sim: GraphSim,
    fx: Fixture,
    tok: String,
    http: reqwest::Client,
}

async fn env(n: usize) -> Env {
    let fx = fixture(n, 11);
    let sim = GraphSim::start(fx.tenant.clone()).await.expect("sim");
    let http = reqwest::Client::new();
    let resp = http
        .post(sim.token_url())
        .form(&[
            ("client_id", fx.tenant.client_id.as_str()),
            ("client_secret", fx.tenant.client_secret.as_str()),
            ("scope", GRAPH_SCOPE),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    let tok = body["access_token"].as_str().unwrap().to_string();
    Env { sim, fx, tok, http }
}

impl Env {
    fn url(&self, query: &str) -> String {
        format!("{}/v1.0/users/delta?{query}", self.sim.graph_url())
    }

    async fn get(
        &self,
        url: &str,
        prefer: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.get(url).bearer_auth(&self.tok);
        if let Some(p) = prefer {
            req = req.header("Prefer", p);
        }
        let resp = req.send().await.unwrap();
        let st = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        (st, headers, body)
    }

    /// Follows nextLinks; returns every object of the round and the deltaLink.
    async fn round_with(&self, first: &str, prefer: Option<&str>) -> (Vec<Value>, usize, String) {
        let mut url = first.to_string();
        let mut objects = Vec::new();
        let mut pages = 0;
        loop {
            let (st, _, body) = self.get(&url, prefer).await;
            assert_eq!(st, 200, "{url}: {body}");
            pages += 1;
            assert!(body["@odata.context"]
                .as_str()
                .unwrap()
                .ends_with("/$metadata#users"));
            let next = body.get("@odata.nextLink").and_then(Value::as_str);
            let delta = body.get("@odata.deltaLink").and_then(Value::as_str);
            assert!(
                next.is_some() != delta.is_some(),
                "exactly one link: {body}"
            );
            objects.extend(body["value"].as_array().unwrap().iter().cloned());
            match (next, delta) {
                (Some(n), _) => {
                    assert!(n.contains("/v1.0/users/delta?$skiptoken="), "{n}");
                    url = n.to_string();
                }
                (_, Some(d)) => {
                    assert!(d.contains("/v1.0/users/delta?$deltatoken="), "{d}");
                    return (objects, pages, d.to_string());
                }
                _ => unreachable!(),
            }
        }
    }

    async fn round(&self, first: &str) -> (Vec<Value>, String) {
        let (objects, _, link) = self.round_with(first, None).await;
        (objects, link)
    }
}

fn by_id(objects: &[Value]) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for o in objects {
        let id = o["id"].as_str().expect("id").to_string();
        assert!(out.insert(id.clone(), o.clone()).is_none(), "{id} twice");
    }
    out
}

fn keys(v: &Value) -> HashSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn set(items: &[&str]) -> HashSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn manager_ref(id: &str) -> Value {
    json!([{ "@odata.type": "#microsoft.graph.user", "id": id }])
}

#[tokio::test]
async fn initial_round_lists_every_user_with_selected_properties_and_manager_links() {
    let e = env(40).await;
    e.sim.set_user_delta_page_size(7);
    let users = e.sim.users();
    assert_eq!(users.len(), 41);
    let (objects, pages, _) = e
        .round_with(&e.url(&format!("$select={SELECT}")), None)
        .await;
    assert_eq!(pages, 41_usize.div_ceil(7));
    let got = by_id(&objects);
    assert_eq!(got.len(), users.len());
    for u in &users {
        let o = &got[&u.id];
        assert_eq!(o["displayName"], json!(u.display_name));
        assert_eq!(o["jobTitle"], json!(u.job_title));
        assert_eq!(o["accountEnabled"], json!(u.account_enabled));
        assert!(o.get("@removed").is_none());
        // Properties never set are left out, not sent as null.
        assert_eq!(o.get("mail").is_some(), u.mail.is_some(), "{o}");
        match &u.manager_id {
            Some(m) => assert_eq!(o["manager@delta"], manager_ref(m)),
            None => assert!(o.get("manager@delta").is_none(), "{o}"),
        }
        // Nothing unselected.
        assert!(keys(o).is_subset(&set(&[
            "id",
            "displayName",
            "jobTitle",
            "mail",
            "accountEnabled",
            "manager@delta"
        ])));
    }
    assert!(got[&e.fx.ceo_id].get("manager@delta").is_none());
    assert!(users.iter().any(|u| u.mail.is_none()));

    // Without `manager` selected no manager is tracked; without $select the default properties.
    let (objects, _) = e.round(&e.url("$select=displayName")).await;
    assert!(objects
        .iter()
        .all(|o| keys(o) == set(&["id", "displayName"])));
    let (objects, _) = e.round(&e.url("")).await;
    let o = &by_id(&objects)[&users[1].id];
    assert!(o.get("userPrincipalName").is_some() && o.get("surname").is_some());
    assert!(o.get("accountEnabled").is_none() && o.get("manager@delta").is_none());
    // The fully qualified function name is the same function.
    let (objects, _) = e
        .round(&format!(
            "{}/v1.0/users/microsoft.graph.delta?$select=id",
            e.sim.graph_url()
        ))
        .await;
    assert_eq!(objects.len(), users.len());
    assert!(e.sim.request_count("userDelta") >= pages as u64 + 3);
    assert_eq!(e.sim.request_count("delta"), 0, "group delta counts apart");
}

#[tokio::test]
async fn filter_by_ids_and_refused_queries() {
    let e = env(30).await;
    let users = e.sim.users();
    let (a, b) = (&users[3].id, &users[7].id);
    let (objects, _) = e
        .round(&e.url(&format!(
            "$filter=id eq '{a}' or id eq '{}'&$select={SELECT}",
            b.to_uppercase()
        )))
        .await;
    let got = by_id(&objects);
    assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), set(&[a, b]));

    for bad in [
        "$expand=manager",
        "$top=5",
        "$orderby=displayName",
        "$select=id,nope",
        "$filter=displayName eq 'x'",
        "$select=id&$select=manager",
    ] {
        let (st, _, body) = e.get(&e.url(bad), None).await;
        assert_eq!(st, 400, "{bad}: {body}");
        assert!(body["error"]["innerError"]["request-id"].is_string());
    }
    let many: Vec<String> = (0..51).map(|i| format!("id eq 'u{i}'")).collect();
    let (st, _, _) = e
        .get(&e.url(&format!("$filter={}", many.join(" or "))), None)
        .await;
    assert_eq!(st, 400);
    let fifty: Vec<String> = (0..50).map(|i| format!("id eq 'u{i}'")).collect();
    let (st, _, body) = e
        .get(&e.url(&format!("$filter={}", fifty.join(" or "))), None)
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["value"], json!([]));
    let resp = e.http.get(e.url("$select=id")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn later_rounds_report_only_changes() {
    let e = env(30).await;
    let (_, link) = e.round(&e.url(&format!("$select={SELECT}"))).await;

    // Nothing changed.
    let (objects, link2) = e.round(&link).await;
    assert_eq!(objects, Vec::<Value>::new());
    assert_ne!(link2, link);

    let users = e.sim.users();
    // Users nobody reports to, with a manager and a mail address.
    let staff: Vec<&SimUser> = users
        .iter()
        .filter(|u| {
            u.manager_id.is_some()
                && u.mail.is_some()
                && !users.iter().any(|r| r.manager_id.as_ref() == Some(&u.id))
        })
        .collect();
    let (title, city, new_mgr, no_mgr) = (staff[0], staff[1], staff[2], staff[3]);
    let other_mgr = e.fx.ceo_id.clone();
    assert_ne!(new_mgr.manager_id.as_ref(), Some(&other_mgr));
    e.sim
        .update_user(&title.id, |u| u.job_title = Some("Chief Tester".into()));
    // Not selected: not tracked.
    e.sim
        .update_user(&city.id, |u| u.city = Some("Reykjavík".into()));
    e.sim
        .update_user(&new_mgr.id, |u| u.manager_id = Some(other_mgr.clone()));
    e.sim.update_user(&no_mgr.id, |u| u.manager_id = None);
    let (objects, link3) = e.round(&link2).await;
    let got = by_id(&objects);
    assert_eq!(
        got.keys().cloned().collect::<HashSet<_>>(),
        set(&[&title.id, &new_mgr.id, &no_mgr.id])
    );
    // Default: every selected property that has a value, the manager only when it changed.
    let t = &got[&title.id];
    assert_eq!(t["jobTitle"], "Chief Tester");
    assert_eq!(t["displayName"], json!(title.display_name));
    assert!(t.get("manager@delta").is_none(), "{t}");
    assert_eq!(got[&new_mgr.id]["manager@delta"], manager_ref(&other_mgr));
    assert_eq!(
        got[&no_mgr.id]["manager@delta"],
        json!([{
            "@odata.type": "#microsoft.graph.user",
            "id": no_mgr.manager_id.clone().unwrap(),
            "@removed": { "reason": "deleted" }
        }])
    );

    // Prefer: return=minimal: only what changed (a property set to null included).
    e.sim.update_user(&title.id, |u| u.mail = None);
    let (objects, _, link4) = e.round_with(&link3, Some("return=minimal")).await;
    assert_eq!(objects, vec![json!({ "id": title.id, "mail": null })]);
    // Without it, a property changed to null is still sent, with the other values.
    let (objects, _) = e.round(&link3).await;
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["mail"], Value::Null);
    assert_eq!(objects[0]["jobTitle"], "Chief Tester");

    // Soft delete, restore, hard delete.
    let (soft, hard) = (staff[4], staff[5]);
    assert!(e.sim.soft_delete_user(&soft.id));
    assert!(e.sim.delete_user(&hard.id));
    let (objects, link5) = e.round(&link4).await;
    let got = by_id(&objects);
    assert_eq!(
        got[&soft.id],
        json!({ "id": soft.id, "@removed": { "reason": "changed" } })
    );
    assert_eq!(
        got[&hard.id],
        json!({ "id": hard.id, "@removed": { "reason": "deleted" } })
    );
    assert_eq!(got.len(), 2);
    assert!(e.sim.restore_user(&soft.id));
    let (objects, link6) = e.round(&link5).await;
    assert_eq!(objects.len(), 1);
    let o = &objects[0];
    assert!(o.get("@removed").is_none());
    assert_eq!(o["displayName"], json!(soft.display_name));
    assert_eq!(
        o["manager@delta"],
        manager_ref(soft.manager_id.as_ref().unwrap())
    );
    // A soft-deleted user hard-deleted later: deleted.
    assert!(e.sim.soft_delete_user(&soft.id));
    assert!(e.sim.delete_user(&soft.id));
    let (objects, link7) = e.round(&link6).await;
    assert_eq!(
        objects,
        vec![json!({ "id": soft.id, "@removed": { "reason": "deleted" } })]
    );

    // A new user is a whole object.
    let newcomer = SimUser {
        id: "a0000000-0000-4000-8000-00000000000a".into(),
        user_principal_name: "new.comer@contoso-sim.onmicrosoft.com".into(),
        display_name: Some("New Comer".into()),
        manager_id: Some(e.fx.ceo_id.clone()),
        account_enabled: true,
        ..Default::default()
    };
    e.sim.upsert_user(newcomer.clone());
    let (objects, link8) = e.round(&link7).await;
    assert_eq!(
        objects,
        vec![json!({
            "id": newcomer.id, "displayName": "New Comer", "accountEnabled": true,
            "manager@delta": manager_ref(&e.fx.ceo_id)
        })]
    );

    // Replaying an older link answers its changes again.
    let (objects, _) = e.round(&link5).await;
    assert_eq!(objects.len(), 2, "{objects:?}");
    let (objects, _) = e.round(&link8).await;
    assert!(objects.is_empty());
}

#[tokio::test]
async fn a_manager_leaving_and_coming_back_changes_the_reports_managers() {
    let e = env(30).await;
    let (_, link) = e.round(&e.url("$select=displayName,manager")).await;
    let users = e.sim.users();
    // A director with reports.
    let boss = users
        .iter()
        .find(|u| {
            users
                .iter()
                .filter(|r| r.manager_id.as_ref() == Some(&u.id))
                .count()
                >= 2
                && u.id != e.fx.ceo_id
        })
        .unwrap();
    let reports: HashSet<String> = users
        .iter()
        .filter(|r| r.manager_id.as_ref() == Some(&boss.id))
        .map(|r| r.id.clone())
        .collect();
    assert!(e.sim.soft_delete_user(&boss.id));
    let (objects, link2) = e.round(&link).await;
    let got = by_id(&objects);
    assert_eq!(got[&boss.id]["@removed"], json!({ "reason": "changed" }));
    for r in &reports {
        assert_eq!(
            got[r],
            json!({
                "id": r,
                "displayName": users.iter().find(|u| &u.id == r).unwrap().display_name,
                "manager@delta": [{
                    "@odata.type": "#microsoft.graph.user", "id": boss.id,
                    "@removed": { "reason": "deleted" }
                }]
            })
        );
    }
    assert_eq!(got.len(), reports.len() + 1);
    // Graph's manager read agrees.
    let r0 = reports.iter().next().unwrap();
    let (st, _, _) = e
        .get(
            &format!("{}/v1.0/users/{r0}/manager", e.sim.graph_url()),
            None,
        )
        .await;
    assert_eq!(st, 404);

    assert!(e.sim.restore_user(&boss.id));
    let (objects, _) = e.round(&link2).await;
    let got = by_id(&objects);
    assert_eq!(got.len(), reports.len() + 1);
    for r in &reports {
        assert_eq!(got[r]["manager@delta"], manager_ref(&boss.id));
    }
    // A filtered link sees only its ids.
    let (_, flink) = e
        .round(&e.url(&format!("$filter=id eq '{r0}'&$select=manager")))
        .await;
    assert!(e.sim.delete_user(&boss.id));
    let (objects, _) = e.round(&flink).await;
    assert_eq!(
        objects,
        vec![json!({ "id": r0, "manager@delta": [{
            "@odata.type": "#microsoft.graph.user", "id": boss.id,
            "@removed": { "reason": "deleted" }
        }] })]
    );
}

#[tokio::test]
async fn soft_deleted_users_appear_removed_in_an_initial_round() {
    let e = env(20).await;
    let users = e.sim.users();
    let gone = &users[5].id;
    assert!(e.sim.soft_delete_user(gone));
    let (objects, _) = e.round(&e.url("$select=displayName,manager")).await;
    let got = by_id(&objects);
    assert_eq!(got.len(), users.len());
    assert_eq!(
        got[gone],
        json!({ "id": gone, "@removed": { "reason": "changed" } })
    );
}

#[tokio::test]
async fn latest_gives_a_link_for_now_and_tokens_expire_with_410() {
    let e = env(25).await;
    e.sim.set_user_delta_page_size(4);
    let query = format!("$filter=id eq '{}'&$select={SELECT}", e.fx.ceo_id);
    let (st, _, body) = e
        .get(&e.url(&format!("{query}&$deltatoken=latest")), None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(body["value"], json!([]));
    assert!(body.get("@odata.nextLink").is_none());
    let from_now = body["@odata.deltaLink"].as_str().unwrap().to_string();
    let (objects, _) = e.round(&from_now).await;
    assert!(objects.is_empty());
    e.sim
        .update_user(&e.fx.ceo_id, |u| u.display_name = Some("Maggie".into()));
    let (objects, _) = e.round(&from_now).await;
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["displayName"], "Maggie");

    // Expiry: delta links and the next page of a round in progress.
    let (st, _, first) = e.get(&e.url(&format!("$select={SELECT}")), None).await;
    assert_eq!(st, 200);
    let next = first["@odata.nextLink"].as_str().unwrap().to_string();
    let (_, link) = e.round(&e.url(&format!("$select={SELECT}"))).await;
    e.sim.expire_delta_tokens();
    for (url, filtered) in [(&from_now, true), (&link, false), (&next, false)] {
        let (st, headers, body) = e.get(url, None).await;
        assert_eq!(st, 410, "{body}");
        assert_eq!(body["error"]["code"], "syncStateNotFound");
        let loc = headers["location"].to_str().unwrap().to_string();
        assert!(loc.contains("/v1.0/users/delta?"), "{loc}");
        assert!(loc.ends_with("$deltatoken="), "{loc}");
        assert!(loc.contains("$select="), "{loc}");
        assert_eq!(loc.contains("$filter="), filtered, "{loc}");
        let (objects, _) = e.round(&loc).await;
        assert_eq!(objects.len(), if filtered { 1 } else { 26 });
    }
    let (st, _, body) = e.get(&e.url("$deltatoken=garbage"), None).await;
    assert_eq!(st, 400);
    assert_eq!(body["error"]["code"], "syncStateNotFound");
    let (st, _, body) = e.get(&e.url("$skiptoken=garbage"), None).await;
    assert_eq!(st, 400);
    assert_eq!(body["error"]["code"], "Directory_ExpiredPageToken");
    // A user delta token is no group delta token.
    let (_, fresh) = e.round(&e.url("$select=id")).await;
    let token = fresh.split("$deltatoken=").nth(1).unwrap();
    let (st, _, body) = e
        .get(
            &format!(
                "{}/v1.0/groups/delta?$deltatoken={token}",
                e.sim.graph_url()
            ),
            None,
        )
        .await;
    assert_eq!(st, 400, "{body}");
    // Parameters cannot be added to a link.
    let (st, _, _) = e.get(&format!("{fresh}&$select=mail"), None).await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn user_delta_inside_batch_honours_prefer() {
    let e = env(15).await;
    let (_, link) = e.round(&e.url(&format!("$select={SELECT}"))).await;
    let someone = e.sim.users()[4].id.clone();
    e.sim
        .update_user(&someone, |u| u.job_title = Some("Batch Tester".into()));
    let rel = link.split("/v1.0").nth(1).unwrap().to_string();
    let body = json!({ "requests": [
        { "id": "1", "method": "GET", "url": rel, "headers": { "Prefer": "return=minimal" } },
    ]});
    let resp = e
        .http
        .post(format!("{}/v1.0/$batch", e.sim.graph_url()))
        .bearer_auth(&e.tok)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let r = &v["responses"][0];
    assert_eq!(r["status"], 200, "{v}");
    assert_eq!(
        r["body"]["value"],
        json!([{ "id": someone, "jobTitle": "Batch Tester" }])
    );
    assert!(r["body"]["@odata.deltaLink"].is_string());
}
