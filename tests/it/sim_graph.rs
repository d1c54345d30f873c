//! Wire-level tests of the Microsoft Graph tenant simulator (`rostersync_sim::graph`).

use std::collections::{HashMap, HashSet};

use rostersync_sim::graph::{fixture, Fixture, GraphFaults, GraphSim, SimGroup, SimUser};
use serde_json::{json, Value};

const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn start(n: usize, seed: u64) -> (GraphSim, Fixture) {
    let fx = fixture(n, seed);
    let sim = GraphSim::start(fx.tenant.clone()).await.expect("start sim");
    (sim, fx)
}

fn token_url(sim: &GraphSim, fx: &Fixture) -> String {
    format!(
        "{}/{}/oauth2/v2.0/token",
        sim.login_url(),
        fx.tenant.tenant_id
    )
}

async fn token(sim: &GraphSim, fx: &Fixture) -> String {
    let resp = client()
        .post(token_url(sim, fx))
        .form(&[
            ("client_id", fx.tenant.client_id.as_str()),
            ("client_secret", fx.tenant.client_secret.as_str()),
            ("scope", GRAPH_SCOPE),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .expect("token request");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("token json");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

async fn get(url: &str, tok: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = client()
        .get(url)
        .bearer_auth(tok)
        .send()
        .await
        .expect("GET");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.expect("json body");
    (status, headers, body)
}

fn assert_graph_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "body: {body}");
    assert!(body["error"]["message"].is_string(), "body: {body}");
    assert!(
        body["error"]["innerError"]["date"].is_string(),
        "body: {body}"
    );
    assert!(
        body["error"]["innerError"]["request-id"].is_string(),
        "body: {body}"
    );
}

fn keys(v: &Value) -> HashSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Users of the fixture that are transitive members of All Employees (all but the CEO).
fn member_users(fx: &Fixture) -> Vec<&SimUser> {
    fx.tenant
        .users
        .iter()
        .filter(|u| u.id != fx.ceo_id)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_success_form_and_basic() {
    let (sim, fx) = start(20, 1).await;
    let resp = client()
        .post(token_url(&sim, &fx))
        .form(&[
            ("client_id", fx.tenant.client_id.as_str()),
            ("client_secret", fx.tenant.client_secret.as_str()),
            ("scope", GRAPH_SCOPE),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    let tok = body["access_token"].as_str().unwrap().to_string();
    assert!(tok.len() > 20);
    assert!(body.get("refresh_token").is_none());

    // HTTP Basic client authentication.
    let resp = client()
        .post(token_url(&sim, &fx))
        .basic_auth(&fx.tenant.client_id, Some(&fx.tenant.client_secret))
        .form(&[("scope", GRAPH_SCOPE), ("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let tok2 = body["access_token"].as_str().unwrap().to_string();
    assert_ne!(tok, tok2);

    // Both tokens work.
    for t in [&tok, &tok2] {
        let (st, _, b) = get(
            &format!("{}/v1.0/groups/{}", sim.graph_url(), fx.all_group_id),
            t,
        )
        .await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["displayName"], "All Employees");
        assert_eq!(b["id"], fx.all_group_id.as_str());
        assert!(b["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/v1.0/$metadata#groups/$entity"));
    }
    assert_eq!(sim.request_count("token"), 2);
    assert_eq!(sim.request_count("group"), 2);
    sim.stop().await;
}

#[tokio::test]
async fn token_errors() {
    let (sim, fx) = start(5, 1).await;
    let t = &fx.tenant;
    struct Case {
        tenant: String,
        form: Vec<(&'static str, String)>,
        status: u16,
        error: &'static str,
        code: u64,
    }
    let good = |skip: &str, over: Option<(&'static str, &str)>| {
        let mut f: Vec<(&'static str, String)> = vec![
            ("client_id", t.client_id.clone()),
            ("client_secret", t.client_secret.clone()),
            ("scope", GRAPH_SCOPE.to_string()),
            ("grant_type", "client_credentials".to_string()),
        ];
        f.retain(|(k, _)| *k != skip);
        if let Some((k, v)) = over {
            for e in f.iter_mut() {
                if e.0 == k {
                    e.1 = v.to_string();
                }
            }
        }
        f
    };
    let cases = vec![
        Case {
            tenant: "00000000-1111-2222-3333-444444444444".into(),
            form: good("", None),
            status: 400,
            error: "invalid_request",
            code: 90002,
        },
        Case {
            tenant: t.tenant_id.clone(),
            form: good(
                "",
                Some(("client_id", "99999999-9999-9999-9999-999999999999")),
            ),
            status: 400,
            error: "unauthorized_client",
            code: 700016,
        },
        Case {
            tenant: t.tenant_id.clone(),
            form: good("", Some(("client_secret", "wrong"))),
            status: 401,
            error: "invalid_client",
            code: 7000215,
        },
        Case {
            tenant: t.tenant_id.clone(),
            form: good("client_secret", None),
            status: 401,
            error: "invalid_client",
            code: 7000218,
        },
        Case {
            tenant: t.tenant_id.clone(),
            form: good(
                "",
                Some(("scope", "https://graph.microsoft.com/User.Read.All")),
            ),
            status: 400,
            error: "invalid_scope",
            code: 70011,
        },
        Case {
            tenant: t.tenant_id.clone(),
            form: good("", Some(("grant_type", "password"))),
            status: 400,
            error: "unsupported_grant_type",
            code: 70003,
        },
    ];
    for c in cases {
        let resp = client()
            .post(format!(
                "{}/{}/oauth2/v2.0/token",
                sim.login_url(),
                c.tenant
            ))
            .form(&c.form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), c.status, "case {}", c.code);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], c.error, "{body}");
        let desc = body["error_description"].as_str().unwrap();
        assert!(desc.starts_with(&format!("AADSTS{}: ", c.code)), "{desc}");
        assert_eq!(body["error_codes"], json!([c.code]));
        for f in ["timestamp", "trace_id", "correlation_id"] {
            assert!(body[f].is_string(), "{f} missing in {body}");
        }
        assert!(body.get("access_token").is_none());
    }
    // Basic auth with a wrong secret.
    let resp = client()
        .post(token_url(&sim, &fx))
        .basic_auth(&t.client_id, Some("nope"))
        .form(&[("scope", GRAPH_SCOPE), ("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error_codes"], json!([7000215]));
    sim.stop().await;
}

#[tokio::test]
async fn token_lifetime_and_expiry() {
    let (sim, fx) = start(5, 1).await;
    sim.set_token_lifetime_secs(1);
    let resp = client()
        .post(token_url(&sim, &fx))
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
    assert_eq!(body["expires_in"], 1);
    let tok = body["access_token"].as_str().unwrap().to_string();
    let url = format!("{}/v1.0/users/{}", sim.graph_url(), fx.ceo_id);
    assert_eq!(get(&url, &tok).await.0, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (st, _, body) = get(&url, &tok).await;
    assert_eq!(st, 401);
    assert_graph_error(&body, "InvalidAuthenticationToken");
    sim.stop().await;
}

#[tokio::test]
async fn api_requires_bearer_token() {
    let (sim, fx) = start(5, 1).await;
    let url = format!("{}/v1.0/groups/{}", sim.graph_url(), fx.all_group_id);
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: Value = resp.json().await.unwrap();
    assert_graph_error(&body, "InvalidAuthenticationToken");

    let (st, _, body) = get(&url, "not-a-token").await;
    assert_eq!(st, 401);
    assert_graph_error(&body, "InvalidAuthenticationToken");

    let resp = client()
        .post(format!("{}/v1.0/$batch", sim.graph_url()))
        .json(&json!({"requests": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Listing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn transitive_members_paging_2500() {
    let (sim, fx) = start(2500, 7).await;
    let tok = token(&sim, &fx).await;
    let mut url = format!(
        "{}/v1.0/groups/{}/transitiveMembers/microsoft.graph.user?$select=id,userPrincipalName,accountEnabled&$top=999",
        sim.graph_url(),
        fx.all_group_id
    );
    let mut seen: Vec<String> = Vec::new();
    let mut pages = 0;
    loop {
        let (st, headers, body) = get(&url, &tok).await;
        assert_eq!(st, 200, "{body}");
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert!(body["@odata.context"]
            .as_str()
            .unwrap()
            .contains("$metadata#users"));
        pages += 1;
        let items = body["value"].as_array().unwrap();
        assert!(items.len() <= 999);
        for it in items {
            assert_eq!(
                keys(it),
                HashSet::from([
                    "id".to_string(),
                    "userPrincipalName".to_string(),
                    "accountEnabled".to_string()
                ])
            );
            seen.push(it["id"].as_str().unwrap().to_string());
        }
        match body.get("@odata.nextLink").and_then(Value::as_str) {
            Some(next) => {
                assert!(next.starts_with(&format!("{}/v1.0/groups/", sim.graph_url())));
                assert!(next.contains("$skiptoken="), "{next}");
                url = next.to_string();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a user was listed twice");
    let expected: HashSet<String> = member_users(&fx).iter().map(|u| u.id.clone()).collect();
    assert_eq!(expected.len(), 2500);
    assert_eq!(unique.len(), 2500);
    assert!(seen.iter().all(|id| expected.contains(id)));
    // Nested-only members are included.
    let nested = fx
        .tenant
        .groups
        .iter()
        .find(|g| g.id == fx.nested_group_id)
        .unwrap();
    assert!(nested.members.iter().all(|m| expected.contains(m)));
    assert_eq!(sim.request_count("transitiveMembers"), 3);

    // Percent-encoded option names work the same.
    let (st, _, body) = get(
        &format!(
            "{}/v1.0/groups/{}/transitiveMembers/microsoft.graph.user?%24select=id&%24top=999",
            sim.graph_url(),
            fx.all_group_id
        ),
        &tok,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(body["value"].as_array().unwrap().len(), 999);
    assert_eq!(keys(&body["value"][0]), HashSet::from(["id".to_string()]));
    // reqwest's query encoder (which emits %24 and %2C).
    let resp = client()
        .get(format!(
            "{}/v1.0/groups/{}/transitiveMembers/microsoft.graph.user",
            sim.graph_url(),
            fx.all_group_id
        ))
        .bearer_auth(&tok)
        .query(&[("$select", "id,mail"), ("$top", "5")])
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["value"].as_array().unwrap().len(), 5);
    assert_eq!(
        keys(&body["value"][0]),
        HashSet::from(["id".to_string(), "mail".to_string()])
    );
    let next = body["@odata.nextLink"].as_str().unwrap();
    let (_, _, body2) = get(next, &tok).await;
    assert_eq!(body2["value"].as_array().unwrap().len(), 5);
    assert_ne!(body["value"][0]["id"], body2["value"][0]["id"]);

    // $top above 999, zero, garbage.
    for top in ["1000", "0", "abc"] {
        let (st, _, body) = get(
            &format!(
                "{}/v1.0/groups/{}/transitiveMembers?$top={top}",
                sim.graph_url(),
                fx.all_group_id
            ),
            &tok,
        )
        .await;
        assert_eq!(st, 400);
        assert_graph_error(&body, "Request_BadRequest");
    }
    // Forged skiptoken.
    let (st, _, _) = get(
        &format!(
            "{}/v1.0/groups/{}/transitiveMembers?$skiptoken=garbage",
            sim.graph_url(),
            fx.all_group_id
        ),
        &tok,
    )
    .await;
    assert_eq!(st, 400);
    sim.stop().await;
}

#[tokio::test]
async fn transitive_members_without_cast_and_direct_members() {
    let (sim, fx) = start(300, 3).await;
    let tok = token(&sim, &fx).await;
    let base = format!("{}/v1.0/groups/{}", sim.graph_url(), fx.all_group_id);
    // Default page size 100; objects carry @odata.type; the nested group is listed.
    let mut url = format!("{base}/transitiveMembers");
    let mut users = HashSet::new();
    let mut groups = Vec::new();
    let mut first = true;
    loop {
        let (st, _, body) = get(&url, &tok).await;
        assert_eq!(st, 200, "{body}");
        assert!(body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("$metadata#directoryObjects"));
        let items = body["value"].as_array().unwrap();
        if first {
            assert_eq!(items.len(), 100);
            first = false;
        }
        for it in items {
            match it["@odata.type"].as_str().unwrap() {
                "#microsoft.graph.user" => {
                    // Graph's default user property set.
                    assert_eq!(
                        keys(it),
                        [
                            "@odata.type",
                            "businessPhones",
                            "displayName",
                            "givenName",
                            "id",
                            "jobTitle",
                            "mail",
                            "mobilePhone",
                            "officeLocation",
                            "preferredLanguage",
                            "surname",
                            "userPrincipalName"
                        ]
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<HashSet<_>>()
                    );
                    assert!(users.insert(it["id"].as_str().unwrap().to_string()));
                }
                "#microsoft.graph.group" => groups.push(it["id"].as_str().unwrap().to_string()),
                other => panic!("unexpected type {other}"),
            }
        }
        match body["@odata.nextLink"].as_str() {
            Some(n) => url = n.to_string(),
            None => break,
        }
    }
    assert_eq!(users.len(), 300);
    assert_eq!(groups, vec![fx.nested_group_id.clone()]);

    // Direct members: no contractors-only users, but the nested group.
    let (st, _, body) = get(&format!("{base}/members?$top=999&$select=id"), &tok).await;
    assert_eq!(st, 200);
    let items = body["value"].as_array().unwrap();
    let direct_ids: HashSet<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert!(direct_ids.contains(fx.nested_group_id.as_str()));
    assert!(items.iter().all(|i| i["@odata.type"].is_string()));
    let contractors_only = fx
        .tenant
        .groups
        .iter()
        .find(|g| g.id == fx.nested_group_id)
        .unwrap()
        .members
        .iter()
        .filter(|m| !direct_ids.contains(m.as_str()))
        .count();
    assert!(contractors_only > 0);
    assert_eq!(items.len(), 300 - contractors_only + 1);
    assert_eq!(sim.request_count("members"), 1);

    // Unknown group: 404 for a GUID.
    let (st, _, body) = get(
        &format!(
            "{}/v1.0/groups/{}/transitiveMembers",
            sim.graph_url(),
            "0b0b0b0b-0000-4000-8000-000000000000"
        ),
        &tok,
    )
    .await;
    assert_eq!(st, 404);
    assert_graph_error(&body, "Request_ResourceNotFound");
    sim.stop().await;
}

#[tokio::test]
async fn select_limits_properties() {
    let (sim, fx) = start(50, 5).await;
    let tok = token(&sim, &fx).await;
    let no_mail = fx.tenant.users.iter().find(|u| u.mail.is_none()).unwrap();
    let u = format!("{}/v1.0/users/{}", sim.graph_url(), no_mail.id);

    let (st, _, body) = get(&u, &tok).await;
    assert_eq!(st, 200);
    assert!(body["@odata.context"]
        .as_str()
        .unwrap()
        .ends_with("$metadata#users/$entity"));
    assert!(body.get("accountEnabled").is_none());
    assert!(body.get("department").is_none());
    assert!(body.get("employeeId").is_none());
    assert_eq!(body["mail"], Value::Null);
    assert!(body["businessPhones"].is_array());

    let (st, _, body) = get(
        &format!("{u}?$select=id,accountEnabled,department,employeeId,mail,onPremisesExtensionAttributes"),
        &tok,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let mut expected: HashSet<String> = [
        "id",
        "accountEnabled",
        "department",
        "employeeId",
        "mail",
        "onPremisesExtensionAttributes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    expected.insert("@odata.context".into());
    assert_eq!(keys(&body), expected);
    assert_eq!(body["mail"], Value::Null, "null present when selected");
    assert_eq!(body["accountEnabled"], no_mail.account_enabled);
    assert_eq!(body["department"].as_str(), no_mail.department.as_deref());
    assert!(body["onPremisesExtensionAttributes"]["extensionAttribute1"].is_null());
    assert!(body["@odata.context"]
        .as_str()
        .unwrap()
        .ends_with("#users(id,accountEnabled,department,employeeId,mail,onPremisesExtensionAttributes)/$entity"));

    // Unknown property.
    let (st, _, body) = get(&format!("{u}?$select=id,favouriteColour"), &tok).await;
    assert_eq!(st, 400);
    assert_graph_error(&body, "Request_BadRequest");
    let (st, _, body) = get(
        &format!(
            "{}/v1.0/groups/{}/transitiveMembers/microsoft.graph.user?$select=id,nope",
            sim.graph_url(),
            fx.all_group_id
        ),
        &tok,
    )
    .await;
    assert_eq!(st, 400);
    assert_graph_error(&body, "Request_BadRequest");

    // Unimplemented OData options are refused, not ignored.
    let (st, _, body) = get(
        &format!(
            "{}/v1.0/groups/{}/transitiveMembers?$filter=accountEnabled%20eq%20true",
            sim.graph_url(),
            fx.all_group_id
        ),
        &tok,
    )
    .await;
    assert_eq!(st, 400);
    assert!(body["error"]["code"].is_string());

    // Lookup by userPrincipalName, incl. the apostrophe one (literal and %27), case-insensitive.
    let obrien = fx
        .tenant
        .users
        .iter()
        .find(|u| u.user_principal_name.contains("o'brien@"))
        .unwrap();
    for key in [
        obrien.user_principal_name.clone(),
        obrien.user_principal_name.replace('\'', "%27"),
        obrien.user_principal_name.to_uppercase(),
    ] {
        let (st, _, body) = get(
            &format!("{}/v1.0/users/{key}?$select=id", sim.graph_url()),
            &tok,
        )
        .await;
        assert_eq!(st, 200, "{key}: {body}");
        assert_eq!(body["id"], obrien.id.as_str());
    }
    let (st, _, body) = get(
        &format!("{}/v1.0/users/nobody@example.com", sim.graph_url()),
        &tok,
    )
    .await;
    assert_eq!(st, 404);
    assert_graph_error(&body, "Request_ResourceNotFound");
    sim.stop().await;
}

#[tokio::test]
async fn manager_and_404_shape() {
    let (sim, fx) = start(100, 9).await;
    let tok = token(&sim, &fx).await;
    let staff = fx
        .tenant
        .users
        .iter()
        .find(|u| u.manager_id.is_some() && u.manager_id.as_deref() != Some(&fx.ceo_id))
        .unwrap();
    let mgr_id = staff.manager_id.clone().unwrap();
    let (st, _, body) = get(
        &format!(
            "{}/v1.0/users/{}/manager?$select=id,mail,displayName",
            sim.graph_url(),
            staff.id
        ),
        &tok,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["@odata.type"], "#microsoft.graph.user");
    assert_eq!(body["id"], mgr_id.as_str());
    assert!(body.get("userPrincipalName").is_none());
    assert!(body["@odata.context"]
        .as_str()
        .unwrap()
        .contains("directoryObjects"));

    // Without $select: default set plus @odata.type.
    let (st, _, body) = get(
        &format!("{}/v1.0/users/{}/manager", sim.graph_url(), staff.id),
        &tok,
    )
    .await;
    assert_eq!(st, 200);
    assert!(body.get("userPrincipalName").is_some());
    assert!(body.get("accountEnabled").is_none());

    // CEO has no manager.
    let (st, headers, body) = get(
        &format!("{}/v1.0/users/{}/manager", sim.graph_url(), fx.ceo_id),
        &tok,
    )
    .await;
    assert_eq!(st, 404);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_graph_error(&body, "Request_ResourceNotFound");
    assert_eq!(
        body["error"]["message"],
        "Resource 'manager' does not exist or one of its queried reference-property objects are not present."
    );
    assert_eq!(sim.request_count("manager"), 3);
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------------
// $batch
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn batch_of_20_managers() {
    let (sim, fx) = start(200, 11).await;
    let tok = token(&sim, &fx).await;
    let subjects: Vec<&SimUser> = member_users(&fx).into_iter().take(20).collect();
    let requests: Vec<Value> = subjects
        .iter()
        .enumerate()
        .map(|(i, u)| {
            json!({
                "id": format!("{}", i + 1),
                "method": "GET",
                "url": format!("/users/{}/manager?$select=id,mail", u.id),
                "headers": {"ConsistencyLevel": "eventual"}
            })
        })
        .collect();
    let resp = client()
        .post(format!("{}/v1.0/$batch", sim.graph_url()))
        .bearer_auth(&tok)
        .json(&json!({ "requests": requests }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let responses = body["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 20);
    let order: Vec<String> = responses
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let request_order: Vec<String> = (1..=20).map(|i| i.to_string()).collect();
    assert_ne!(
        order, request_order,
        "responses must not come back in request order"
    );
    let by_id: HashMap<&str, &Value> = responses
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_id.len(), 20);
    for (i, u) in subjects.iter().enumerate() {
        let r = by_id[format!("{}", i + 1).as_str()];
        assert_eq!(r["status"], 200, "{r}");
        assert!(r["headers"]["Content-Type"]
            .as_str()
            .unwrap()
            .starts_with("application/json"));
        assert_eq!(r["body"]["id"].as_str(), u.manager_id.as_deref());
        assert_eq!(r["body"]["@odata.type"], "#microsoft.graph.user");
    }
    assert_eq!(sim.request_count("batch"), 1);
    assert_eq!(sim.request_count("manager"), 20);

    // Inner 404 for the CEO; inner errors keep the Graph error shape; relative URL without "/".
    let resp = client()
        .post(format!("{}/v1.0/$batch", sim.graph_url()))
        .bearer_auth(&tok)
        .json(&json!({"requests": [
            {"id": "a", "method": "GET", "url": format!("/users/{}/manager", fx.ceo_id)},
            {"id": "b", "method": "GET", "url": format!("users/{}?$select=id", fx.ceo_id)},
            {"id": "c", "method": "GET", "url": format!("/users/{}?$select=id", fx.ceo_id), "dependsOn": ["a"]},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let by_id: HashMap<&str, &Value> = body["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_id["a"]["status"], 404);
    assert_graph_error(&by_id["a"]["body"], "Request_ResourceNotFound");
    assert_eq!(by_id["b"]["status"], 200);
    assert_eq!(by_id["b"]["body"]["id"], fx.ceo_id.as_str());
    assert_eq!(by_id["c"]["status"], 424);
    sim.stop().await;
}

#[tokio::test]
async fn batch_validation() {
    let (sim, fx) = start(30, 2).await;
    let tok = token(&sim, &fx).await;
    let post = |body: Value| {
        let url = format!("{}/v1.0/$batch", sim.graph_url());
        let tok = tok.clone();
        async move {
            let resp = client()
                .post(url)
                .bearer_auth(&tok)
                .json(&body)
                .send()
                .await
                .unwrap();
            let st = resp.status().as_u16();
            (st, resp.json::<Value>().await.unwrap())
        }
    };
    let req = |id: &str| json!({"id": id, "method": "GET", "url": format!("/users/{}", fx.ceo_id)});
    let (st, body) =
        post(json!({"requests": (1..=21).map(|i| req(&i.to_string())).collect::<Vec<_>>()})).await;
    assert_eq!(st, 400);
    assert!(body["error"]["code"].is_string());
    assert!(body["error"]["innerError"]["request-id"].is_string());
    let (st, _) = post(json!({"requests": [req("1"), req("1")]})).await;
    assert_eq!(st, 400, "duplicate ids");
    let (st, _) = post(json!({"requests": [req("1"), {"method": "GET", "url": "/users"}]})).await;
    assert_eq!(st, 400, "missing id");
    let (st, _) = post(json!({"nope": []})).await;
    assert_eq!(st, 400);
    let resp = client()
        .post(format!("{}/v1.0/$batch", sim.graph_url()))
        .bearer_auth(&tok)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // %24batch is the same endpoint.
    let resp = client()
        .post(format!("{}/v1.0/%24batch", sim.graph_url()))
        .bearer_auth(&tok)
        .json(&json!({"requests": [req("x")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Throttling
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn throttling_full_rate() {
    let (sim, fx) = start(30, 4).await;
    let tok = token(&sim, &fx).await;
    sim.set_faults(GraphFaults {
        throttle_rate: 1.0,
        retry_after_secs: 7,
        seed: 42,
    });
    let (st, headers, body) = get(
        &format!(
            "{}/v1.0/groups/{}/transitiveMembers",
            sim.graph_url(),
            fx.all_group_id
        ),
        &tok,
    )
    .await;
    assert_eq!(st, 429);
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(body["error"]["code"], "TooManyRequests");
    assert!(body["error"]["message"].is_string());

    // Token endpoint is never throttled.
    let tok2 = token(&sim, &fx).await;
    assert!(!tok2.is_empty());

    // Inner batch requests are throttled individually; the batch itself answers 200.
    let resp = client()
        .post(format!("{}/v1.0/$batch", sim.graph_url()))
        .bearer_auth(&tok)
        .json(&json!({"requests": [
            {"id": "1", "method": "GET", "url": format!("/users/{}", fx.ceo_id)},
            {"id": "2", "method": "GET", "url": format!("/users/{}/manager", fx.ceo_id)},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    for r in body["responses"].as_array().unwrap() {
        assert_eq!(r["status"], 429);
        assert_eq!(r["headers"]["Retry-After"], "7");
        assert_eq!(r["body"]["error"]["code"], "TooManyRequests");
    }
    assert_eq!(sim.request_count("throttled"), 3);

    sim.set_faults(GraphFaults::default());
    let (st, _, _) = get(
        &format!("{}/v1.0/users/{}", sim.graph_url(), fx.ceo_id),
        &tok,
    )
    .await;
    assert_eq!(st, 200);
    sim.stop().await;
}

#[tokio::test]
async fn throttling_is_seeded() {
    let fx = fixture(10, 1);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let sim = GraphSim::start(fx.tenant.clone()).await.unwrap();
        let tok = token(&sim, &fx).await;
        sim.set_faults(GraphFaults {
            throttle_rate: 0.5,
            retry_after_secs: 0,
            seed: 1234,
        });
        let mut statuses = Vec::new();
        for _ in 0..40 {
            let (st, _, _) = get(
                &format!("{}/v1.0/users/{}", sim.graph_url(), fx.ceo_id),
                &tok,
            )
            .await;
            statuses.push(st);
        }
        assert!(statuses.contains(&429) && statuses.contains(&200));
        runs.push(statuses);
        sim.stop().await;
    }
    assert_eq!(runs[0], runs[1]);
}

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

async fn list_users(sim: &GraphSim, tok: &str, group: &str) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let mut url = format!(
        "{}/v1.0/groups/{group}/transitiveMembers/microsoft.graph.user?$select=id,displayName,accountEnabled&$top=999",
        sim.graph_url()
    );
    loop {
        let (st, _, body) = get(&url, tok).await;
        assert_eq!(st, 200, "{body}");
        for it in body["value"].as_array().unwrap() {
            let id = it["id"].as_str().unwrap().to_string();
            assert!(out.insert(id, it.clone()).is_none());
        }
        match body["@odata.nextLink"].as_str() {
            Some(n) => url = n.to_string(),
            None => return out,
        }
    }
}

#[tokio::test]
async fn mutations_visible_in_next_listing() {
    let (sim, fx) = start(120, 8).await;
    let tok = token(&sim, &fx).await;
    let all = fx.all_group_id.as_str();
    let before = list_users(&sim, &tok, all).await;
    assert_eq!(before.len(), 120);

    let all_group = fx.tenant.groups.iter().find(|g| g.id == all).unwrap();
    let direct_user = all_group
        .members
        .iter()
        .rev()
        .find(|m| **m != fx.nested_group_id)
        .unwrap()
        .clone();
    sim.remove_member(all, &direct_user);
    let l = list_users(&sim, &tok, all).await;
    assert_eq!(l.len(), 119);
    assert!(!l.contains_key(&direct_user));

    let nested_user = fx
        .tenant
        .groups
        .iter()
        .find(|g| g.id == fx.nested_group_id)
        .unwrap()
        .members
        .last()
        .unwrap()
        .clone();
    assert!(sim.delete_user(&nested_user));
    assert!(sim.user(&nested_user).is_none());
    let l = list_users(&sim, &tok, all).await;
    assert_eq!(l.len(), 118);
    assert!(!l.contains_key(&nested_user));
    let (st, _, _) = get(
        &format!("{}/v1.0/users/{nested_user}", sim.graph_url()),
        &tok,
    )
    .await;
    assert_eq!(st, 404);

    let victim = l.keys().next().unwrap().clone();
    assert!(sim.update_user(&victim, |u| {
        u.display_name = Some("Renamed Person".into());
        u.account_enabled = false;
    }));
    assert!(!sim.update_user("00000000-0000-4000-8000-000000000000", |_| {}));
    let l = list_users(&sim, &tok, all).await;
    assert_eq!(l[&victim]["displayName"], "Renamed Person");
    assert_eq!(l[&victim]["accountEnabled"], false);

    // New user added to the nested group shows up transitively.
    let newbie = SimUser {
        id: "7a7a7a7a-0000-4000-8000-000000000001".into(),
        user_principal_name: "new.hire@contoso-sim.onmicrosoft.com".into(),
        display_name: Some("New Hire".into()),
        account_enabled: true,
        ..Default::default()
    };
    sim.upsert_user(newbie.clone());
    sim.add_member(&fx.nested_group_id, &newbie.id);
    let l = list_users(&sim, &tok, all).await;
    assert_eq!(l.len(), 119);
    assert!(l.contains_key(&newbie.id));

    // Deleting the nested group drops its members that are not direct members too.
    assert!(sim.delete_group(&fx.nested_group_id));
    let l = list_users(&sim, &tok, all).await;
    assert!(!l.contains_key(&newbie.id));
    assert!(l.len() < 119);
    sim.stop().await;
}

#[tokio::test]
async fn nested_cycles_are_tolerated() {
    let (sim, fx) = start(10, 1).await;
    let tok = token(&sim, &fx).await;
    let a = "aaaaaaaa-0000-4000-8000-00000000000a";
    let b = "bbbbbbbb-0000-4000-8000-00000000000b";
    let user = fx.tenant.users[3].id.clone();
    sim.add_group(SimGroup {
        id: a.into(),
        display_name: "A".into(),
        members: vec![b.into(), user.clone()],
    });
    sim.add_group(SimGroup {
        id: b.into(),
        display_name: "B".into(),
        members: vec![a.into(), user.clone(), user.clone()],
    });
    let l = list_users(&sim, &tok, a).await;
    assert_eq!(l.len(), 1);
    assert!(l.contains_key(&user));
    let (st, _, body) = get(
        &format!("{}/v1.0/groups/{a}/transitiveMembers", sim.graph_url()),
        &tok,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(body["value"].as_array().unwrap().len(), 2, "{body}");
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

#[test]
fn fixture_300_has_promised_properties() {
    let fx = fixture(300, 1);
    let t = &fx.tenant;
    assert_eq!(t.client_secret, "sim-secret-value");
    assert!(uuid::Uuid::parse_str(&t.tenant_id).is_ok());
    assert!(uuid::Uuid::parse_str(&t.client_id).is_ok());
    assert_eq!(t.users.len(), 301, "300 members + the CEO");
    let by_id: HashMap<&str, &SimUser> = t.users.iter().map(|u| (u.id.as_str(), u)).collect();
    assert_eq!(by_id.len(), 301, "ids are unique");
    assert!(t.users.iter().all(|u| uuid::Uuid::parse_str(&u.id).is_ok()));
    let upns: HashSet<String> = t
        .users
        .iter()
        .map(|u| u.user_principal_name.to_lowercase())
        .collect();
    assert_eq!(upns.len(), 301, "UPNs are unique");

    let groups: HashMap<&str, &SimGroup> = t.groups.iter().map(|g| (g.id.as_str(), g)).collect();
    let all = groups[fx.all_group_id.as_str()];
    let nested = groups[fx.nested_group_id.as_str()];
    assert_eq!(all.display_name, "All Employees");
    assert_eq!(nested.display_name, "Contractors");
    assert!(all.members.contains(&fx.nested_group_id));

    // Transitive membership.
    let direct: HashSet<&str> = all
        .members
        .iter()
        .map(String::as_str)
        .filter(|m| by_id.contains_key(m))
        .collect();
    let via_nested: HashSet<&str> = nested.members.iter().map(String::as_str).collect();
    let members: HashSet<&str> = direct.union(&via_nested).copied().collect();
    assert_eq!(members.len(), 300);
    let nested_only = via_nested.difference(&direct).count();
    assert!(
        (20..=40).contains(&nested_only),
        "~10% nested only: {nested_only}"
    );

    // CEO: in no group, no manager, top of a chain of 3+ levels.
    assert!(!members.contains(fx.ceo_id.as_str()));
    assert!(t.groups.iter().all(|g| !g.members.contains(&fx.ceo_id)));
    assert!(by_id[fx.ceo_id.as_str()].manager_id.is_none());
    let mut max_depth = 0;
    for m in &members {
        let u = by_id[m];
        let mgr = u.manager_id.as_deref().expect("every member has a manager");
        assert!(by_id.contains_key(mgr));
        if mgr != fx.ceo_id {
            assert!(members.contains(mgr), "manager inside the group");
        }
        let mut depth = 0;
        let mut cur = u;
        while let Some(next) = cur.manager_id.as_deref() {
            depth += 1;
            assert!(depth < 20, "manager cycle");
            cur = by_id[next];
        }
        assert_eq!(cur.id, fx.ceo_id);
        max_depth = max_depth.max(depth);
    }
    assert!(max_depth >= 3, "chain depth {max_depth}");

    let disabled = t.users.iter().filter(|u| !u.account_enabled).count();
    assert!((6..=12).contains(&disabled), "~3% disabled: {disabled}");
    assert!(t.users.iter().any(|u| u.mail.is_none()));
    let names: HashSet<&str> = t
        .users
        .iter()
        .filter_map(|u| u.display_name.as_deref())
        .collect();
    for n in ["Zoë Ångström", "José Núñez", "李 小龙"] {
        assert!(names.contains(n), "{n}");
    }
    assert_eq!(
        t.users
            .iter()
            .filter(|u| u.user_principal_name.contains("o'brien@"))
            .count(),
        1
    );
    assert_eq!(
        t.users
            .iter()
            .filter(|u| u.job_title.as_deref().map(|j| j.chars().count()) == Some(200))
            .count(),
        1
    );
    assert_eq!(
        t.users.iter().filter(|u| u.employee_id.is_none()).count(),
        1
    );
    let departments: HashSet<&str> = t
        .users
        .iter()
        .filter_map(|u| u.department.as_deref())
        .collect();
    assert!(departments.len() >= 5);
    let countries: HashSet<&str> = t
        .users
        .iter()
        .filter_map(|u| u.country.as_deref())
        .collect();
    assert!(countries.len() >= 5);
    assert!(t
        .users
        .iter()
        .all(|u| u.city.is_some() && u.office_location.is_some()));
    assert!(t
        .users
        .iter()
        .any(|u| u.employee_type.as_deref() == Some("Contractor")));

    // Deterministic per seed.
    let again = fixture(300, 1);
    let ids = |f: &Fixture| {
        f.tenant
            .users
            .iter()
            .map(|u| u.id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&fx), ids(&again));
    assert_eq!(fx.all_group_id, again.all_group_id);
    let other = fixture(300, 2);
    assert_ne!(ids(&fx), ids(&other));
}

#[test]
fn fixture_small_sizes_do_not_panic() {
    for n in 0..40 {
        let fx = fixture(n, n as u64);
        assert_eq!(fx.tenant.users.len(), n + 1);
    }
}

#[tokio::test]
async fn large_tenant_pages_quickly() {
    let (sim, fx) = start(20_000, 3).await;
    let tok = token(&sim, &fx).await;
    let started = std::time::Instant::now();
    let l = list_users(&sim, &tok, &fx.all_group_id).await;
    assert_eq!(l.len(), 20_000);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    sim.stop().await;
}

async fn post_json(url: &str, tok: &str, body: &Value) -> (u16, Value) {
    let resp = client()
        .post(url)
        .bearer_auth(tok)
        .json(body)
        .send()
        .await
        .expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

/// `checkMemberGroups` answers transitively, alone and inside `$batch`, and 404s a user that
/// is gone (the call that confirms a deactivation).
#[tokio::test]
async fn check_member_groups_is_transitive_and_batched() {
    let (sim, fx) = start(40, 3).await;
    let tok = token(&sim, &fx).await;
    let nested = sim.group(&fx.nested_group_id).expect("nested group");
    let all = sim.group(&fx.all_group_id).expect("main group");
    let via_nested = nested
        .members
        .iter()
        .find(|m| sim.user(m).is_some() && !all.members.contains(m))
        .expect("a user in the nested group")
        .clone();
    let url = |u: &str| format!("{}/v1.0/users/{u}/checkMemberGroups", sim.graph_url());
    let unknown = "00000000-0000-4000-8000-000000000abc";
    let ids = json!({"groupIds": [fx.all_group_id, unknown]});
    let (st, body) = post_json(&url(&via_nested), &tok, &ids).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["value"], json!([fx.all_group_id]), "{body}");

    // Removed from the nested group: a member of neither.
    sim.remove_member(&fx.nested_group_id, &via_nested);
    let (_, body) = post_json(&url(&via_nested), &tok, &ids).await;
    assert_eq!(body["value"], json!([]), "{body}");

    // More than 20 ids, a missing body and GET are refused.
    let many: Vec<String> = (0..21).map(|i| format!("g{i}")).collect();
    let (st, _) = post_json(&url(&via_nested), &tok, &json!({"groupIds": many})).await;
    assert_eq!(st, 400);
    let (st, _, body) = get(&url(&via_nested), &tok).await;
    assert_eq!(st, 405, "{body}");

    // Soft-deleted: 404, also in a batch, where a body needs its Content-Type.
    sim.soft_delete_user(&via_nested);
    let batch = format!("{}/v1.0/$batch", sim.graph_url());
    let (st, body) = post_json(
        &batch,
        &tok,
        &json!({"requests": [
            {"id": "1", "method": "POST", "url": format!("/users/{via_nested}/checkMemberGroups"),
             "headers": {"Content-Type": "application/json"}, "body": ids},
            {"id": "2", "method": "POST", "url": format!("/users/{}/checkMemberGroups", member_users(&fx)[0].id),
             "headers": {"Content-Type": "application/json"}, "body": ids},
        ]}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let by_id: HashMap<String, Value> = body["responses"]
        .as_array()
        .expect("responses")
        .iter()
        .map(|r| (r["id"].as_str().unwrap_or("").to_string(), r.clone()))
        .collect();
    assert_eq!(by_id["1"]["status"], 404);
    assert_eq!(by_id["2"]["status"], 200);
    assert_eq!(by_id["2"]["body"]["value"], json!([fx.all_group_id]));
    let (st, body) = post_json(
        &batch,
        &tok,
        &json!({"requests": [{"id": "1", "method": "POST",
            "url": format!("/users/{}/checkMemberGroups", member_users(&fx)[0].id), "body": ids}]}),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    sim.stop().await;
}

/// The user-read log (kept only when asked for) names the user of each single-user read, alone
/// or in `$batch`, by id whatever key was sent, and leaves out throttled requests, manager
/// reads and group listings.
#[tokio::test]
async fn user_reads_are_logged_only_when_recorded() {
    let (sim, fx) = start(20, 5).await;
    let tok = token(&sim, &fx).await;
    let u = member_users(&fx)
        .into_iter()
        .find(|u| {
            u.user_principal_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".@-".contains(c))
        })
        .expect("a plain UPN")
        .clone();
    let base = sim.graph_url();
    let (st, _, _) = get(&format!("{base}/v1.0/users/{}", u.id), &tok).await;
    assert_eq!(st, 200);
    assert!(sim.user_reads().is_empty(), "off by default");

    sim.record_user_reads(true);
    let before = std::time::Instant::now();
    let upn = &u.user_principal_name;
    for path in [
        format!("/v1.0/users/{}", u.id.to_uppercase()),
        format!("/v1.0/users/{upn}"),
        format!("/v1.0/users/{}/manager", u.id),
        format!("/v1.0/users/{}/transitiveMemberOf", u.id),
        format!("/v1.0/groups/{}/transitiveMembers", fx.all_group_id),
        "/v1.0/users/00000000-0000-4000-8000-00000000dead".to_string(),
    ] {
        get(&format!("{base}{path}"), &tok).await;
    }
    let ids = json!({"groupIds": [fx.all_group_id]});
    let (st, body) = post_json(
        &format!("{base}/v1.0/$batch"),
        &tok,
        &json!({"requests": [
            {"id": "1", "method": "POST", "url": format!("/users/{}/checkMemberGroups", u.id),
             "headers": {"Content-Type": "application/json"}, "body": ids},
        ]}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    sim.set_faults(GraphFaults {
        throttle_rate: 1.0,
        retry_after_secs: 1,
        seed: 1,
    });
    let (st, _, _) = get(&format!("{base}/v1.0/users/{}", u.id), &tok).await;
    assert_eq!(st, 429);

    let reads = sim.user_reads();
    let got: Vec<(&str, &str)> = reads.iter().map(|r| (r.user.as_str(), r.kind)).collect();
    let id = u.id.to_lowercase();
    assert_eq!(
        got,
        vec![
            (id.as_str(), "user"),
            (id.as_str(), "user"),
            (id.as_str(), "memberOf"),
            ("00000000-0000-4000-8000-00000000dead", "user"),
            (id.as_str(), "checkMemberGroups"),
        ]
    );
    assert!(reads.iter().all(|r| r.at >= before));
    assert!(reads.windows(2).all(|w| w[0].at <= w[1].at));
    sim.record_user_reads(false);
    assert!(sim.user_reads().is_empty());
    sim.stop().await;
}

/// The service's Graph client reads a manager's direct reports from the simulator (by id or
/// UPN, users only, 404 for nobody).
#[tokio::test]
async fn graph_client_reads_direct_reports_from_the_sim() {
    use rostersync::graph::credential::ClientCredential;
    use rostersync::graph::{GraphClient, GraphSettings};

    let user = |id: &str, manager: Option<&str>| SimUser {
        id: id.into(),
        user_principal_name: format!("{id}@x"),
        account_enabled: true,
        manager_id: manager.map(str::to_string),
        ..Default::default()
    };
    let tenant = rostersync_sim::graph::Tenant {
        tenant_id: "t-reports".into(),
        client_id: "c-reports".into(),
        client_secret: "s-reports".into(),
        users: vec![
            user("boss", None),
            user("r2", Some("boss")),
            user("r1", Some("BOSS")),
            user("r3", Some("boss")),
            user("solo", None),
        ],
        groups: Vec::new(),
    };
    let sim = GraphSim::start(tenant).await.unwrap();
    let client = GraphClient::new(
        GraphSettings {
            tenant_id: "t-reports".into(),
            client_id: "c-reports".into(),
            credential: ClientCredential::Secret(secrecy::SecretString::from("s-reports")),
            login_url: url::Url::parse(&sim.login_url()).unwrap(),
            graph_url: url::Url::parse(&sim.graph_url()).unwrap(),
        },
        reqwest::Client::builder().no_proxy().build().unwrap(),
    );
    assert_eq!(
        client.direct_reports("boss").await.unwrap(),
        ["r1", "r2", "r3"]
    );
    assert_eq!(
        client.direct_reports("boss@x").await.unwrap(),
        ["r1", "r2", "r3"]
    );
    assert!(client.direct_reports("solo").await.unwrap().is_empty());
    let err = client.direct_reports("nobody").await.unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
    assert_eq!(sim.request_count("directReports"), 4);
    sim.stop().await;
}
