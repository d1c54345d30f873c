//! Wire-level tests of the SCIM LMS simulator (`rostersync_sim::scim`) over real HTTP.

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::header::HeaderMap;
use reqwest::Method;
use rostersync_sim::scim::{ScimFaults, ScimSim, ScimSimConfig};
use serde_json::{json, Value};

const CORE: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const ENT: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
const ACME: &str = "urn:ietf:params:scim:schemas:extension:acme:2.0:User";
const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Resp {
    fn scim_type(&self) -> Option<&str> {
        self.body.get("scimType").and_then(Value::as_str)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Harness {
    sim: ScimSim,
    http: reqwest::Client,
    token: String,
}

fn acme_config() -> ScimSimConfig {
    ScimSimConfig {
        custom_extension: Some((
            ACME.to_string(),
            vec![
                "officeLocation".into(),
                "city".into(),
                "country".into(),
                "managerEmail".into(),
                "managerDisplayName".into(),
            ],
        )),
        ..ScimSimConfig::default()
    }
}

impl Harness {
    async fn new(cfg: ScimSimConfig) -> Harness {
        let token = cfg.token.clone();
        let sim = ScimSim::start(cfg).await.expect("start simulator");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client");
        Harness { sim, http, token }
    }

    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> Resp {
        let url = format!("{}{}", self.sim.base_url(), path);
        let mut rb = self.http.request(method, url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.header("Content-Type", "application/scim+json").body(b);
        }
        let resp = rb.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON body {text:?}: {e}"))
        };
        if status >= 400 {
            // Every error is a SCIM Error message with a string status (RFC 7644 §3.12).
            assert_eq!(body["status"], json!(status.to_string()), "{body}");
            assert_eq!(
                body["schemas"],
                json!(["urn:ietf:params:scim:api:messages:2.0:Error"])
            );
            assert_eq!(
                headers.get("content-type").and_then(|v| v.to_str().ok()),
                Some("application/scim+json")
            );
        }
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn req(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        let token = self.token.clone();
        self.send_raw(method, path, body.map(|b| b.to_string()), Some(&token))
            .await
    }
    async fn get(&self, path: &str) -> Resp {
        self.req(Method::GET, path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> Resp {
        self.req(Method::POST, path, Some(body)).await
    }
    async fn patch(&self, id: &str, ops: Value) -> Resp {
        self.req(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(json!({"schemas": [PATCH_OP], "Operations": ops})),
        )
        .await
    }
    /// GET /Users with a `%20`-encoded filter.
    async fn filter(&self, filter: &str) -> Resp {
        let enc = utf8_percent_encode(filter, NON_ALPHANUMERIC).to_string();
        self.get(&format!("/Users?filter={enc}")).await
    }
    async fn create(&self, user: Value) -> String {
        let r = self.post("/Users", user).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().expect("id").to_string()
    }
}

fn user(name: &str) -> Value {
    json!({
        "schemas": [CORE, ENT],
        "userName": name,
        "externalId": format!("ext-{name}"),
        "name": {"givenName": "Ada", "familyName": "Lovelace"},
        "displayName": "Ada Lovelace",
        "active": true,
        "emails": [{"value": name, "type": "work", "primary": true}],
        ENT: {"department": "Maths", "employeeNumber": "0001"},
    })
}

#[tokio::test]
async fn create_get_and_duplicate() {
    let h = Harness::new(ScimSimConfig::default()).await;
    let mut body = user("ada@example.edu");
    body["id"] = json!("client-chosen");
    body["meta"] = json!({"resourceType": "User"});
    body["title"] = Value::Null;
    body["roles"] = json!([]);
    let r = h.post("/Users", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/scim+json"));
    let id = r.body["id"].as_str().expect("id").to_string();
    assert_ne!(id, "client-chosen", "readOnly id is ignored");
    let loc = r.body["meta"]["location"].as_str().expect("location");
    assert_eq!(r.header("location"), Some(loc));
    assert_eq!(loc, format!("{}/Users/{id}", h.sim.base_url()));
    assert_eq!(r.body["meta"]["resourceType"], "User");
    assert!(r.body["meta"]["created"].is_string());
    assert!(r.body.get("title").is_none() && r.body.get("roles").is_none());
    assert_eq!(r.body["schemas"], json!([CORE, ENT]));

    let g = h.get(&format!("/Users/{id}")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, r.body);
    assert_eq!(h.sim.users(), vec![r.body.clone()]);
    assert_eq!(
        h.sim.user_by_user_name("ADA@example.EDU"),
        Some(r.body.clone())
    );
    assert_eq!(
        h.sim.user_by_external_id("ext-ada@example.edu"),
        Some(r.body.clone())
    );
    assert_eq!(h.sim.user_by_external_id("EXT-ada@example.edu"), None);

    // Same userName in another case → 409 uniqueness.
    let dup = h.post("/Users", user("ADA@Example.EDU")).await;
    assert_eq!(dup.status, 409);
    assert_eq!(dup.scim_type(), Some("uniqueness"));

    let mut no_name = user("x@example.edu");
    no_name.as_object_mut().map(|o| o.remove("userName"));
    let r = h.post("/Users", no_name).await;
    assert_eq!((r.status, r.scim_type()), (400, Some("invalidValue")));

    assert_eq!(h.get("/Users/does-not-exist").await.status, 404);
    assert_eq!(h.sim.request_count("POST"), 3);
    h.sim.stop().await;
}

#[tokio::test]
async fn post_validation_is_strict() {
    let h = Harness::new(acme_config()).await;
    let cases = [
        // Unknown core attribute.
        json!({"schemas": [CORE], "userName": "a", "favouriteColour": "blue"}),
        // Extension object whose URN is not in `schemas`.
        json!({"schemas": [CORE], "userName": "a", ENT: {"department": "X"}}),
        // Undeclared extension URN.
        json!({"schemas": [CORE, "urn:example:ext:1.0:User"], "userName": "a",
               "urn:example:ext:1.0:User": {"x": "y"}}),
        // Unknown attribute inside an extension.
        json!({"schemas": [CORE, ENT], "userName": "a", ENT: {"shoeSize": "44"}}),
        // Unknown sub-attribute.
        json!({"schemas": [CORE], "userName": "a", "name": {"nickname": "x"}}),
        // Boolean as a string (strict by default).
        json!({"schemas": [CORE], "userName": "a", "active": "False"}),
        // Missing schemas.
        json!({"userName": "a"}),
        // Two primaries.
        json!({"schemas": [CORE], "userName": "a", "emails": [
            {"value": "a@x", "primary": true}, {"value": "b@x", "primary": true}]}),
    ];
    for c in cases {
        let r = h.post("/Users", c.clone()).await;
        assert_eq!(
            (r.status, r.scim_type()),
            (400, Some("invalidValue")),
            "{c}"
        );
    }
    // Case-insensitive attribute names are canonicalised.
    let r = h
        .post(
            "/Users",
            json!({"schemas": [CORE, ACME], "USERNAME": "b", "Active": false,
                   ACME: {"officelocation": "B12"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["userName"], "b");
    assert_eq!(r.body["active"], false);
    assert_eq!(r.body[ACME]["officeLocation"], "B12");
    assert_eq!(r.body["schemas"], json!([CORE, ACME]));

    let bad = h
        .send_raw(
            Method::POST,
            "/Users",
            Some("{\"schemas\": [".into()),
            Some("sim-scim-token"),
        )
        .await;
    assert_eq!((bad.status, bad.scim_type()), (400, Some("invalidSyntax")));

    let huge = json!({"schemas": [CORE], "userName": "x".repeat(2 << 20)});
    let r = h.post("/Users", huge).await;
    assert_eq!(r.status, 413);

    assert!(h
        .sim
        .insert_user(json!({"schemas": [CORE], "userName": "B"}))
        .is_err());
    assert!(h
        .sim
        .insert_user(json!({"schemas": [CORE], "userName": "c"}))
        .is_ok());
    h.sim.stop().await;
}

#[tokio::test]
async fn lenient_accepts_entra_shapes() {
    let h = Harness::new(ScimSimConfig {
        lenient_ops: true,
        ..ScimSimConfig::default()
    })
    .await;
    let r = h
        .post(
            "/Users",
            json!({"schemas": [CORE, ENT], "userName": "e", "active": "True",
                   ENT: {"manager": "mgr-id"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["active"], true);
    assert_eq!(r.body[ENT]["manager"], json!({"value": "mgr-id"}));
    let id = r.body["id"].as_str().expect("id").to_string();
    let p = h
        .patch(
            &id,
            json!([{"op": "Replace", "path": "active", "value": "False"},
                   {"op": "Add", "path": "emails", "value": [{"value": "e@x", "type": "work"}]}]),
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.body["active"], false);
    assert_eq!(p.body["emails"][0]["value"], "e@x");
    h.sim.stop().await;
}

#[tokio::test]
async fn filters_escape_and_plus() {
    let h = Harness::new(ScimSimConfig::default()).await;
    let tricky = r#"o"brien\x'y@example.edu"#;
    let id = h.create(user(tricky)).await;
    h.create(user("plain@example.edu")).await;

    // Build the value with a JSON serializer (docs/scim.md).
    let lit = serde_json::to_string(tricky).expect("json");
    let r = h.filter(&format!("userName eq {lit}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["totalResults"], 1);
    assert_eq!(r.body["Resources"][0]["id"], json!(id));
    assert_eq!(r.body["Resources"][0]["userName"], tricky);

    // userName is caseExact false; externalId is caseExact true.
    let upper = serde_json::to_string(&tricky.to_uppercase()).expect("json");
    assert_eq!(
        h.filter(&format!("USERNAME Eq {upper}")).await.body["totalResults"],
        1
    );
    let ext = serde_json::to_string(&format!("EXT-{tricky}")).expect("json");
    assert_eq!(
        h.filter(&format!("externalId eq {ext}")).await.body["totalResults"],
        0
    );

    // `+` for spaces, as Entra sends.
    let r = h
        .get("/Users?filter=externalId+eq+%22ext-plain%40example.edu%22&count=5")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["totalResults"], 1);
    assert_eq!(r.body["Resources"][0]["userName"], "plain@example.edu");

    // Nothing matches: 200 with totalResults 0 and no Resources (Entra's test connection).
    let r = h
        .filter("userName eq \"2b1d7c0e-8f3a-4c55-9a43-1f0d6f8b9e21\"")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["totalResults"], 0);
    assert!(r.body.get("Resources").is_none());

    // Richer filters.
    let total = |f: String| {
        let h = &h;
        async move { h.filter(&f).await.body["totalResults"].clone() }
    };
    assert_eq!(
        total("emails[type eq \"work\" and value co \"@EXAMPLE\"]".to_string()).await,
        2
    );
    assert_eq!(total("emails[type eq \"home\"]".to_string()).await, 0);
    assert_eq!(
        total("userName sw \"o\" or (name.givenName eq \"nobody\" and active eq true)".to_string())
            .await,
        1
    );
    assert_eq!(total("not (userName sw \"o\")".to_string()).await, 1);
    assert_eq!(
        total(
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department eq \"maths\""
                .to_string()
        )
        .await,
        2
    );
    assert_eq!(total("title pr".to_string()).await, 0);
    assert_eq!(
        total("meta.created gt \"2000-01-01T00:00:00Z\"".to_string()).await,
        2
    );
    assert_eq!(total(format!("id eq \"{id}\"")).await, 1);

    for bad in [
        "userName eq",
        "userName eq plain",
        "userName zz \"x\"",
        "shoeSize eq \"44\"",
        "(userName eq \"x\"",
        "active gt true",
        "department eq \"Maths\"",
    ] {
        let r = h.filter(bad).await;
        assert_eq!(
            (r.status, r.scim_type()),
            (400, Some("invalidFilter")),
            "{bad}"
        );
    }

    // SearchRequest (RFC 7644 §3.4.3).
    let r = h
        .post(
            "/Users/.search",
            json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
                   "filter": format!("userName eq {lit}"), "startIndex": 1, "count": 10}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["totalResults"], 1);
    h.sim.stop().await;
}

#[tokio::test]
async fn paging_250_users() {
    let h = Harness::new(ScimSimConfig::default()).await;
    for i in 0..250 {
        h.sim
            .insert_user(json!({"schemas": [CORE], "userName": format!("u{i:03}@x.edu")}))
            .expect("insert");
    }
    let mut start = 1;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = h.get(&format!("/Users?startIndex={start}&count=100")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["totalResults"], 250);
        assert_eq!(r.body["startIndex"], start);
        let res = r.body["Resources"].as_array().cloned().unwrap_or_default();
        assert_eq!(r.body["itemsPerPage"], res.len());
        if res.is_empty() {
            break;
        }
        pages += 1;
        seen.extend(
            res.iter()
                .map(|u| u["userName"].as_str().unwrap_or("").to_string()),
        );
        start += res.len();
        if start > 250 {
            break;
        }
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..250).map(|i| format!("u{i:03}@x.edu")).collect();
    assert_eq!(seen, want, "creation order, no duplicates");

    let r = h.get("/Users?count=0").await;
    assert_eq!(r.body["totalResults"], 250);
    assert!(r.body.get("Resources").is_none());
    let r = h.get("/Users?count=1000&startIndex=0").await;
    assert_eq!(r.body["itemsPerPage"], 100, "capped at max_page_size");
    assert_eq!(r.body["startIndex"], 1);
    assert_eq!(r.body["Resources"][0]["userName"], "u000@x.edu");
    let r = h.get("/Users?startIndex=251").await;
    assert_eq!(r.body["itemsPerPage"], 0);
    let r = h
        .get("/Users?filter=userName+sw+%22u24%22&count=3&startIndex=2")
        .await;
    assert_eq!(r.body["totalResults"], 10);
    assert_eq!(r.body["Resources"][0]["userName"], "u241@x.edu");
    assert_eq!(r.body["itemsPerPage"], 3);
    let r = h.get("/Users?count=abc").await;
    assert_eq!(r.status, 400);
    h.sim.stop().await;
}

#[tokio::test]
async fn patch_path_forms() {
    let h = Harness::new(acme_config()).await;
    let mgr = h.create(user("boss@example.edu")).await;
    let mut u = user("ada@example.edu");
    u["title"] = json!("Lecturer");
    let created = h.post("/Users", u).await;
    let id = created.body["id"].as_str().expect("id").to_string();
    let created_at = created.body["meta"]["lastModified"].clone();

    let r = h
        .patch(
            &id,
            json!([
                {"op": "replace", "path": "name.givenName", "value": "Augusta"},
                {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "augusta@example.edu"},
                {"op": "add", "path": "emails", "value": [{"value": "a@home.org", "type": "home", "primary": true}]},
                {"op": "replace", "path": format!("{ENT}:department"), "value": "Computing"},
                {"op": "add", "path": format!("{ENT}:manager"), "value": {"value": mgr}},
                {"op": "replace", "path": format!("{ACME}:officeLocation"), "value": "B12"},
                {"op": "remove", "path": "title"},
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let b = &r.body;
    assert_eq!(
        b["name"],
        json!({"givenName": "Augusta", "familyName": "Lovelace"})
    );
    assert_eq!(
        b["emails"],
        json!([{"value": "augusta@example.edu", "type": "work", "primary": false},
               {"value": "a@home.org", "type": "home", "primary": true}])
    );
    assert_eq!(b[ENT]["department"], "Computing");
    assert_eq!(b[ENT]["manager"], json!({"value": mgr}));
    assert_eq!(b[ACME]["officeLocation"], "B12");
    assert_eq!(
        b["schemas"],
        json!([CORE, ENT, ACME]),
        "extension URN added"
    );
    assert!(b.get("title").is_none());
    assert_eq!(h.get(&format!("/Users/{id}")).await.body, r.body);

    // No-path replace with plain, dotted and URN keys (Entra aadOptscim062020 shape).
    let r = h
        .patch(
            &id,
            json!([{"op": "replace", "value": {
                "displayName": "Augusta Ada King",
                "name.familyName": "King",
                format!("{ENT}:employeeNumber"): "0042",
                ACME: {"city": "London"},
            }}]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["displayName"], "Augusta Ada King");
    assert_eq!(r.body["name"]["familyName"], "King");
    assert_eq!(r.body[ENT]["employeeNumber"], "0042");
    assert_eq!(
        r.body[ACME],
        json!({"officeLocation": "B12", "city": "London"})
    );

    // Removes: value-filtered element, manager, last custom attributes drop the URN.
    let r = h
        .patch(
            &id,
            json!([
                {"op": "remove", "path": "emails[type eq \"home\"]"},
                {"op": "remove", "path": format!("{ENT}:manager")},
                {"op": "remove", "path": format!("{ACME}:officeLocation")},
                {"op": "remove", "path": format!("{ACME}:city")},
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["emails"].as_array().map(Vec::len), Some(1));
    assert!(r.body[ENT].get("manager").is_none());
    assert!(r.body.get(ACME).is_none());
    assert_eq!(r.body["schemas"], json!([CORE, ENT]));
    assert_ne!(r.body["meta"]["lastModified"], created_at);

    // A no-op add (value already present) does not bump lastModified.
    let before = r.body["meta"]["lastModified"].clone();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let r = h
        .patch(
            &id,
            json!([{"op": "add", "path": "emails", "value": r.body["emails"].clone()}]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["meta"]["lastModified"], before);

    // Errors.
    let err = |ops: Value| {
        let h = &h;
        let id = id.clone();
        async move {
            let r = h.patch(&id, ops).await;
            (r.status, r.scim_type().map(str::to_string))
        }
    };
    let bad = |t: &str| (400, Some(t.to_string()));
    assert_eq!(
        err(json!([{"op": "replace", "path": "emails[type eq \"fax\"].value", "value": "x"}]))
            .await,
        bad("noTarget")
    );
    assert_eq!(err(json!([{"op": "remove"}])).await, bad("noTarget"));
    assert_eq!(
        err(json!([{"op": "replace", "path": "id", "value": "x"}])).await,
        bad("mutability")
    );
    assert_eq!(
        err(json!([{"op": "replace", "value": {"meta": {"created": "x"}}}])).await,
        bad("mutability")
    );
    assert_eq!(
        err(json!([{"op": "remove", "path": "userName"}])).await,
        bad("mutability")
    );
    assert_eq!(
        err(json!([{"op": "replace", "path": "shoeSize", "value": "x"}])).await,
        bad("invalidPath")
    );
    assert_eq!(
        err(json!([{"op": "replace", "path": "emails[type eq]", "value": "x"}])).await,
        bad("invalidFilter")
    );
    assert_eq!(
        err(json!([{"op": "replace", "path": "active", "value": "False"}])).await,
        bad("invalidValue")
    );
    assert_eq!(
        err(json!([{"op": "Replace", "path": "title", "value": "x"}])).await,
        bad("invalidSyntax")
    );
    assert_eq!(
        err(json!([{"op": "add", "path": format!("{ENT}:shoeSize"), "value": "44"}])).await,
        bad("invalidPath")
    );
    assert_eq!(
        err(json!([{"op": "add", "value": {"urn:example:undeclared:User": {"x": "y"}}}])).await,
        bad("invalidValue")
    );
    assert_eq!(err(json!([])).await, bad("invalidSyntax"));
    let r = h
        .req(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(json!({"schemas": [PATCH_OP], "operations": [{"op": "remove", "path": "title"}]})),
        )
        .await;
    assert_eq!((r.status, r.scim_type()), (400, Some("invalidSyntax")));
    let r = h
        .req(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(json!({"Operations": [{"op": "remove", "path": "title"}]})),
        )
        .await;
    assert_eq!((r.status, r.scim_type()), (400, Some("invalidSyntax")));

    // Renaming onto another user's userName (case differs) → 409.
    let r = h
        .patch(
            &id,
            json!([{"op": "replace", "path": "userName", "value": "BOSS@example.edu"}]),
        )
        .await;
    assert_eq!((r.status, r.scim_type()), (409, Some("uniqueness")));
    // Changing the case of one's own userName is fine.
    let r = h
        .patch(
            &id,
            json!([{"op": "replace", "path": "userName", "value": "ADA@example.edu"}]),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        h.filter("userName eq \"ada@EXAMPLE.edu\"").await.body["totalResults"],
        1
    );

    assert_eq!(
        h.patch("no-such-id", json!([{"op": "remove", "path": "title"}]))
            .await
            .status,
        404
    );
    h.sim.stop().await;
}

#[tokio::test]
async fn patch_is_atomic() {
    let h = Harness::new(ScimSimConfig::default()).await;
    let id = h.create(user("ada@example.edu")).await;
    let before = h.get(&format!("/Users/{id}")).await.body;
    let r = h
        .patch(
            &id,
            json!([
                {"op": "replace", "path": "title", "value": "Professor"},
                {"op": "replace", "path": "emails[type eq \"other\"].value", "value": "x@y"},
            ]),
        )
        .await;
    assert_eq!((r.status, r.scim_type()), (400, Some("noTarget")));
    assert_eq!(h.get(&format!("/Users/{id}")).await.body, before);
    h.sim.stop().await;
}

#[tokio::test]
async fn op_case_strict_and_lenient() {
    for (lenient, want) in [(false, 400), (true, 200)] {
        let h = Harness::new(ScimSimConfig {
            lenient_ops: lenient,
            ..ScimSimConfig::default()
        })
        .await;
        let id = h.create(user("ada@example.edu")).await;
        let r = h
            .patch(
                &id,
                json!([{"op": "Replace", "path": "title", "value": "Dr"}]),
            )
            .await;
        assert_eq!(r.status, want, "lenient={lenient}: {}", r.body);
        let r = h
            .patch(
                &id,
                json!([{"op": "replace", "path": "active", "value": "False"}]),
            )
            .await;
        assert_eq!(r.status, want, "lenient={lenient}: {}", r.body);
        if lenient {
            assert_eq!(r.body["active"], false);
        } else {
            assert_eq!(r.scim_type(), Some("invalidValue"));
        }
        h.sim.stop().await;
    }
}

#[tokio::test]
async fn put_delete_and_patch_204() {
    let h = Harness::new(ScimSimConfig {
        patch_returns_204: true,
        ..ScimSimConfig::default()
    })
    .await;
    let id = h.create(user("ada@example.edu")).await;
    let r = h
        .patch(
            &id,
            json!([{"op": "replace", "path": "title", "value": "Dr"}]),
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.body, Value::Null);
    // 200 is mandatory when `attributes` is given (RFC 7644 §3.5.2).
    let r = h
        .req(
            Method::PATCH,
            &format!("/Users/{id}?attributes=title"),
            Some(json!({"schemas": [PATCH_OP], "Operations": [{"op": "replace", "path": "title", "value": "Prof"}]})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["title"], "Prof");
    assert!(r.body.get("userName").is_none());
    assert_eq!(r.body["id"], json!(id));

    let r = h
        .req(
            Method::PUT,
            &format!("/Users/{id}"),
            Some(json!({"schemas": [CORE], "userName": "ada@example.edu", "title": "Dean"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["title"], "Dean");
    assert!(
        r.body.get("emails").is_none(),
        "PUT replaces the whole resource"
    );
    assert_eq!(r.body["schemas"], json!([CORE]));

    let r = h
        .get("/Users?excludedAttributes=emails,name.givenName&filter=userName+eq+%22ada%40example.edu%22")
        .await;
    assert!(r.body["Resources"][0].get("emails").is_none());

    let r = h.req(Method::DELETE, &format!("/Users/{id}"), None).await;
    assert_eq!(r.status, 204);
    assert_eq!(h.get(&format!("/Users/{id}")).await.status, 404);
    assert_eq!(
        h.req(Method::DELETE, &format!("/Users/{id}"), None)
            .await
            .status,
        404
    );
    assert_eq!(
        h.filter("userName eq \"ada@example.edu\"").await.body["totalResults"],
        0
    );
    assert_eq!(h.sim.request_count("DELETE"), 2);

    assert_eq!(h.post("/Bulk", json!({})).await.status, 501);
    let r = h.get("/Groups").await;
    assert_eq!(r.status, 404);
    h.sim.stop().await;
}

#[tokio::test]
async fn auth_faults_and_down() {
    let h = Harness::new(ScimSimConfig::default()).await;
    let r = h.send_raw(Method::GET, "/Users", None, None).await;
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("Bearer")));
    let r = h.send_raw(Method::GET, "/Users", None, Some("wrong")).await;
    assert_eq!(r.status, 401);

    h.sim.set_faults(ScimFaults {
        rate_429: 1.0,
        retry_after_secs: 7,
        ..ScimFaults::default()
    });
    let r = h.get("/Users").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(h.sim.request_count("429"), 1);

    h.sim.set_faults(ScimFaults {
        rate_500: 1.0,
        ..ScimFaults::default()
    });
    assert_eq!(h.get("/Users").await.status, 500);

    h.sim.set_faults(ScimFaults {
        rate_500_after_create: 1.0,
        ..ScimFaults::default()
    });
    let r = h.post("/Users", user("lost@example.edu")).await;
    assert_eq!(r.status, 500);
    assert!(
        h.sim.user_by_user_name("lost@example.edu").is_some(),
        "created anyway"
    );
    assert_eq!(h.sim.request_count("500"), 2);

    h.sim.set_faults(ScimFaults {
        rate_429: 0.5,
        seed: 42,
        ..ScimFaults::default()
    });
    let mut n429 = 0;
    for _ in 0..40 {
        if h.get("/Users?count=1").await.status == 429 {
            n429 += 1;
        }
    }
    assert!((5..=35).contains(&n429), "{n429}");

    h.sim.set_faults(ScimFaults::default());
    h.sim.set_down(true);
    assert_eq!(h.get("/Users").await.status, 503);
    h.sim.set_down(false);
    assert_eq!(h.get("/Users").await.status, 200);
    h.sim.reset_counts();
    assert_eq!(h.sim.request_count("GET"), 0);
    h.sim.stop().await;
}

#[tokio::test]
async fn discovery_documents() {
    let h = Harness::new(acme_config()).await;
    let spc = h.get("/ServiceProviderConfig").await;
    assert_eq!(spc.status, 200);
    assert_eq!(spc.body["patch"]["supported"], true);
    assert_eq!(spc.body["bulk"]["supported"], false);
    assert_eq!(
        spc.body["filter"],
        json!({"supported": true, "maxResults": 100})
    );
    assert_eq!(spc.body["etag"]["supported"], false);
    assert_eq!(spc.body["sort"]["supported"], false);
    assert_eq!(spc.body["changePassword"]["supported"], false);
    assert_eq!(
        spc.body["authenticationSchemes"][0]["type"],
        "oauthbearertoken"
    );

    let s = h.get("/Schemas").await;
    assert_eq!(s.status, 200);
    assert_eq!(s.body["totalResults"], 3);
    let res = s.body["Resources"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = res.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids, vec![CORE, ENT, ACME]);
    let attr = |schema: &Value, name: &str| -> Value {
        schema["attributes"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let core = &res[0];
    let un = attr(core, "userName");
    assert_eq!(un["uniqueness"], "server");
    assert_eq!(un["caseExact"], false);
    assert_eq!(un["required"], true);
    assert_eq!(un["mutability"], "readWrite");
    assert_eq!(attr(core, "id")["caseExact"], true);
    assert_eq!(attr(core, "externalId")["caseExact"], true);
    assert_eq!(attr(core, "active")["type"], "boolean");
    assert_eq!(attr(core, "password")["returned"], "never");
    assert_eq!(attr(core, "groups")["mutability"], "readOnly");
    let emails = attr(core, "emails");
    assert_eq!(emails["multiValued"], true);
    assert!(emails["subAttributes"]
        .as_array()
        .is_some_and(|s| s.len() == 4));
    assert!(attr(core, "name")["subAttributes"].is_array());
    assert!(attr(core, "phoneNumbers")["subAttributes"].is_array());
    let mgr = attr(&res[1], "manager");
    assert!(mgr["subAttributes"].as_array().is_some_and(|s| s
        .iter()
        .any(|x| x["name"] == "displayName" && x["mutability"] == "readOnly")));
    assert_eq!(attr(&res[2], "managerEmail")["type"], "string");

    let one = h.get(&format!("/Schemas/{ACME}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.body["id"], ACME);
    assert_eq!(h.get("/Schemas/urn:nope").await.status, 404);

    let rt = h.get("/ResourceTypes").await;
    assert_eq!(rt.status, 200);
    let user_rt = &rt.body["Resources"][0];
    assert_eq!(user_rt["endpoint"], "/Users");
    assert_eq!(user_rt["schema"], CORE);
    assert_eq!(
        user_rt["schemaExtensions"],
        json!([{"schema": ENT, "required": false}, {"schema": ACME, "required": false}])
    );
    assert_eq!(h.get("/ResourceTypes/User").await.body["id"], "User");
    assert_eq!(h.get("/Schemas?filter=id+eq+%22x%22").await.status, 403);
    h.sim.stop().await;

    let h = Harness::new(ScimSimConfig {
        serve_discovery: false,
        ..ScimSimConfig::default()
    })
    .await;
    for p in ["/ServiceProviderConfig", "/Schemas", "/ResourceTypes"] {
        assert_eq!(h.get(p).await.status, 404, "{p}");
    }
    h.sim.stop().await;
}

#[tokio::test]
async fn hundred_thousand_users() {
    let h = Harness::new(ScimSimConfig::default()).await;
    let t0 = std::time::Instant::now();
    for i in 0..100_000 {
        h.sim
            .insert_user(
                json!({"schemas": [CORE], "userName": format!("user{i}@big.edu"),
                                "externalId": format!("E{i}")}),
            )
            .expect("insert");
    }
    let insert = t0.elapsed();
    let t1 = std::time::Instant::now();
    for i in (0..100_000).step_by(9_973) {
        let r = h.filter(&format!("userName eq \"USER{i}@big.edu\"")).await;
        assert_eq!(r.body["totalResults"], 1);
        let r = h
            .filter(&format!("externalId eq \"E{i}\" and active pr"))
            .await;
        assert_eq!(r.body["totalResults"], 0);
    }
    let indexed = t1.elapsed();
    let r = h.get("/Users?startIndex=99950&count=100").await;
    assert_eq!(r.body["itemsPerPage"], 51);
    assert_eq!(r.body["Resources"][0]["userName"], "user99949@big.edu");
    let r = h.filter("userName ew \"99999@big.edu\"").await;
    assert_eq!(r.body["totalResults"], 1);
    assert!(indexed.as_secs() < 5, "indexed lookups took {indexed:?}");
    eprintln!("100k inserts: {insert:?}, 22 indexed filters: {indexed:?}");
    h.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_are_unique() {
    let h = std::sync::Arc::new(Harness::new(ScimSimConfig::default()).await);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let name = if i % 2 == 0 {
                "Race@X.edu"
            } else {
                "race@x.EDU"
            };
            h.post("/Users", user(name)).await.status
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.expect("task"));
    }
    codes.sort();
    assert_eq!(codes.iter().filter(|c| **c == 201).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 409).count(), 15, "{codes:?}");
    assert_eq!(h.sim.users().len(), 1);
    // Paths outside the base, or glued onto it, are unknown endpoints.
    let r = h
        .send_raw(Method::GET, "Users", None, Some("sim-scim-token"))
        .await;
    assert_eq!(r.status, 404);
}

/// Each dialect switch reproduces what a partial server answers (and the default stays
/// strict, which every other test here checks).
#[tokio::test]
async fn dialect_switches_reproduce_partial_servers() {
    use rostersync_sim::scim::SimDialect;
    let sim = ScimSim::start(ScimSimConfig {
        dialect: SimDialect::partial_library(),
        ..ScimSimConfig::default()
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let base = sim.base_url();
    let token = sim.token();
    let send = |m: Method, path: &str, body: Option<Value>| {
        let mut rb = http.request(m, format!("{base}{path}")).bearer_auth(&token);
        if let Some(b) = body {
            rb = rb
                .header("Content-Type", "application/scim+json")
                .body(b.to_string());
        }
        async move {
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let text = r.text().await.unwrap();
            (status, ct, text)
        }
    };
    let json_of = |t: &str| -> Value { serde_json::from_str(t).unwrap_or(Value::Null) };

    // Discovery: no totalResults; the config says patch yes, filter no.
    let (s, _, t) = send(Method::GET, "/Schemas", None).await;
    assert_eq!(s, 200);
    assert!(json_of(&t).get("totalResults").is_none() && json_of(&t)["Resources"].is_array());
    let (_, _, t) = send(Method::GET, "/ResourceTypes", None).await;
    assert!(json_of(&t).get("totalResults").is_none());
    let (_, _, t) = send(Method::GET, "/ServiceProviderConfig", None).await;
    let spc = json_of(&t);
    assert_eq!(
        (
            spc["patch"]["supported"].clone(),
            spc["filter"]["supported"].clone()
        ),
        (json!(true), json!(false))
    );
    // 404 with an empty body; 401 with an empty text/html body.
    let (s, _, t) = send(Method::GET, "/Schemas/urn:nope", None).await;
    assert_eq!((s, t.as_str()), (404, ""));
    let r = http.get(format!("{base}/Users")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(r.text().await.unwrap(), "");

    // Untyped e-mails, a computed displayName.
    let (s, _, t) = send(Method::POST, "/Users", Some(user("ada@x.example"))).await;
    assert_eq!(s, 201, "{t}");
    let ada = json_of(&t);
    let id = ada["id"].as_str().unwrap().to_string();
    assert_eq!(
        ada["emails"],
        json!([{"value": "ada@x.example", "primary": true}])
    );
    assert_eq!(ada["displayName"], "Lovelace, Ada");
    // userName uniqueness is case-sensitive; the filter is not.
    let (s, _, t) = send(Method::POST, "/Users", Some(user("ada@x.example"))).await;
    assert_eq!(s, 409);
    assert_eq!(
        json_of(&t),
        json!({"status": 409, "detail": "userName \"ada@x.example\" is already in use"})
    );
    let (s, _, _) = send(Method::POST, "/Users", Some(user("ADA@x.example"))).await;
    assert_eq!(s, 201, "another case is another user here");
    let enc = |f: &str| utf8_percent_encode(f, NON_ALPHANUMERIC).to_string();
    let (_, _, t) = send(
        Method::GET,
        &format!("/Users?filter={}", enc("userName eq \"ada@X.example\"")),
        None,
    )
    .await;
    assert_eq!(json_of(&t)["totalResults"], 2);
    // externalId is not filterable: 200 and nothing.
    let (s, _, t) = send(
        Method::GET,
        &format!(
            "/Users?filter={}",
            enc("externalId eq \"ext-ada@x.example\"")
        ),
        None,
    )
    .await;
    assert_eq!((s, json_of(&t)["totalResults"].clone()), (200, json!(0)));

    // PATCH: replace only; displayName and externalId refused although declared writable.
    let patch = |ops: Value| Some(json!({"schemas": [PATCH_OP], "Operations": ops}));
    let path = format!("/Users/{id}");
    let (s, _, _) = send(
        Method::PATCH,
        &path,
        patch(json!([{"op": "add", "path": "title", "value": "x"}])),
    )
    .await;
    assert_eq!(s, 501);
    let (s, _, _) = send(
        Method::PATCH,
        &path,
        patch(json!([{"op": "remove", "path": "title"}])),
    )
    .await;
    assert_eq!(s, 501);
    let (s, _, t) = send(
        Method::PATCH,
        &path,
        patch(json!([{"op": "replace", "path": "title", "value": "T"},
                     {"op": "replace", "path": "externalId", "value": "e"}])),
    )
    .await;
    assert_eq!(s, 400);
    let e = json_of(&t);
    assert_eq!(e["scimType"], "mutability");
    assert!(
        e["detail"].as_str().unwrap().contains("Operations[1]"),
        "{e}"
    );
    let (s, _, _) = send(
        Method::PATCH,
        &path,
        patch(json!([{"op": "replace", "path": "emails[type eq \"work\"].value", "value": "n@x"}])),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _, t) = send(
        Method::PATCH,
        &path,
        patch(json!([{"op": "replace", "path": "title", "value": "T"}])),
    )
    .await;
    assert_eq!((s, json_of(&t)["title"].clone()), (200, json!("T")));
    let (s, _, t) = send(
        Method::PATCH,
        &path,
        patch(json!([{"op": "replace", "path": "title", "value": null}])),
    )
    .await;
    assert_eq!(s, 200);
    assert!(json_of(&t).get("title").is_none());

    // The other presets: PUT only, no filter, nothing clears.
    let only_put = ScimSim::start(ScimSimConfig {
        dialect: SimDialect::put_only(),
        ..ScimSimConfig::default()
    })
    .await
    .unwrap();
    let h = Harness {
        sim: only_put,
        http: reqwest::Client::new(),
        token: "sim-scim-token".into(),
    };
    let uid = h.create(user("p@x.example")).await;
    assert_eq!(
        h.patch(
            &uid,
            json!([{"op": "replace", "path": "title", "value": "x"}])
        )
        .await
        .status,
        501
    );
    assert_eq!(
        h.get("/ServiceProviderConfig").await.body["patch"]["supported"],
        false
    );
    let mut full = h.get(&format!("/Users/{uid}")).await.body;
    full["title"] = json!("by PUT");
    assert_eq!(
        h.req(Method::PUT, &format!("/Users/{uid}"), Some(full))
            .await
            .body["title"],
        "by PUT"
    );
    let nf = Harness::new(ScimSimConfig {
        dialect: SimDialect::no_filter(),
        ..ScimSimConfig::default()
    })
    .await;
    let r = nf.filter("userName eq \"x\"").await;
    assert_eq!((r.status, r.scim_type()), (400, Some("invalidFilter")));
    let nc = Harness::new(ScimSimConfig {
        dialect: SimDialect::no_clear(),
        ..ScimSimConfig::default()
    })
    .await;
    let cid = nc.create(user("c@x.example")).await;
    for op in [
        json!({"op": "replace", "path": "title", "value": null}),
        json!({"op": "replace", "path": "title", "value": ""}),
    ] {
        let r = nc.patch(&cid, json!([op])).await;
        assert_eq!((r.status, r.scim_type()), (400, Some("invalidValue")));
    }
    let r = nc
        .req(
            Method::PUT,
            &format!("/Users/{cid}"),
            Some(user("c@x.example")),
        )
        .await;
    assert_eq!(r.status, 501);
}

/// The write log (kept only when asked for) holds every committed write with its method, the
/// user, `active` before and after, and the attributes it changed; refused writes and reads
/// are not in it.
#[tokio::test]
async fn write_log_records_committed_writes() {
    let h = Harness::new(ScimSimConfig::default()).await;
    h.create(user("before@example.com")).await;
    assert!(h.sim.writes().is_empty(), "off by default");
    h.sim.record_writes(true);
    let t0 = std::time::Instant::now();
    let id = h.create(user("ada@example.com")).await;
    let r = h.post("/Users", user("ada@example.com")).await;
    assert_eq!(r.status, 409);
    let r = h
        .patch(
            &id,
            json!([{"op": "replace", "path": "active", "value": false},
                   {"op": "replace", "path": format!("{ENT}:department"), "value": "Physics"}]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = h
        .patch(
            &id,
            json!([{"op": "replace", "path": "active", "value": false}]),
        )
        .await;
    assert_eq!(r.status, 200);
    let mut whole = user("ada@example.com");
    whole["title"] = json!("Countess");
    let r = h
        .req(Method::PUT, &format!("/Users/{id}"), Some(whole))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    h.get(&format!("/Users/{id}")).await;
    let r = h.req(Method::DELETE, &format!("/Users/{id}"), None).await;
    assert_eq!(r.status, 204);

    let log = h.sim.writes();
    type Seen<'a> = (&'a str, Option<bool>, Option<bool>, Vec<String>);
    let got: Vec<Seen> = log
        .iter()
        .map(|w| (w.method, w.active_before, w.active_after, w.changed.clone()))
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(got[0].0, "POST");
    assert_eq!((got[0].1, got[0].2), (None, Some(true)));
    assert!(got[0].3.contains(&"userName".to_string()));
    assert_eq!(
        got[1..],
        [
            (
                "PATCH",
                Some(true),
                Some(false),
                s(&["active", &format!("{ENT}:department")])
            ),
            ("PATCH", Some(false), Some(false), s(&[])),
            (
                "PUT",
                Some(false),
                Some(true),
                s(&["active", "title", &format!("{ENT}:department")])
            ),
            ("DELETE", Some(true), None, got[4].3.clone()),
        ]
    );
    assert!(log.iter().all(|w| w.id == id
        && w.external_id.as_deref() == Some("ext-ada@example.com")
        && w.user_name.as_deref() == Some("ada@example.com")
        && w.at >= t0));
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    h.sim.record_writes(false);
    assert!(h.sim.writes().is_empty());
}

/// The LMS limits a simulator can put on: a token bucket (429 + `Retry-After` in seconds or
/// as an HTTP date), a concurrency limit (503 + `Retry-After`) and added latency.
#[tokio::test]
async fn rate_and_concurrency_limits_answer_with_retry_after() {
    use rostersync_sim::scim::{ConcurrencyLimit, RateLimit};
    use std::time::{Duration, Instant};
    let h = Harness::new(ScimSimConfig::default()).await;
    h.sim.set_faults(ScimFaults {
        rate_limit: Some(RateLimit {
            per_second: 2.0,
            burst: 3.0,
            http_date: false,
        }),
        ..ScimFaults::default()
    });
    let statuses: Vec<u16> = futures::future::join_all((0..5).map(|_| h.get("/Users?count=1")))
        .await
        .into_iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    let r = h.get("/Users?count=1").await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.header("retry-after"),
        Some("1"),
        "the next token, in whole seconds"
    );
    assert_eq!(h.sim.request_count("429"), 3);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(h.get("/Users?count=1").await.status, 200, "refilled");

    h.sim.set_faults(ScimFaults {
        rate_limit: Some(RateLimit {
            per_second: 1.0,
            burst: 1.0,
            http_date: true,
        }),
        ..ScimFaults::default()
    });
    assert_eq!(h.get("/Users?count=1").await.status, 200);
    let r = h.get("/Users?count=1").await;
    assert_eq!(r.status, 429);
    let date = r.header("retry-after").expect("Retry-After");
    assert!(
        chrono::DateTime::parse_from_rfc2822(date).is_ok() && date.ends_with("GMT"),
        "{date}"
    );

    h.sim.set_faults(ScimFaults {
        latency: Duration::from_millis(300),
        concurrency_limit: Some(ConcurrencyLimit {
            max: 2,
            retry_after_secs: 4,
        }),
        ..ScimFaults::default()
    });
    let started = Instant::now();
    let answers = futures::future::join_all((0..4).map(|_| h.get("/Users?count=1"))).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "latency added"
    );
    let shed: Vec<_> = answers.iter().filter(|r| r.status == 503).collect();
    assert_eq!(shed.len(), 2);
    assert_eq!(shed[0].header("retry-after"), Some("4"));
    let log = h.sim.throttles();
    assert!(log
        .iter()
        .any(|t| t.status == 503 && t.retry_after_secs == 4));
    h.sim.stop().await;
}

const BULK_REQUEST: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";

/// RFC 7644 §3.7: bulk is advertised only when configured; operations run in order, a later
/// one may refer to a user created earlier by `bulkId:`, each reports its own status, an
/// unresolvable reference fails only its operation (409), `failOnErrors` stops the request,
/// and too many operations are refused whole with 413.
#[tokio::test]
async fn bulk_follows_rfc_7644() {
    let off = Harness::new(ScimSimConfig::default()).await;
    assert_eq!(
        off.get("/ServiceProviderConfig").await.body["bulk"]["supported"],
        false
    );
    let r = off
        .post(
            "/Bulk",
            json!({"schemas": [BULK_REQUEST], "Operations": []}),
        )
        .await;
    assert_eq!(r.status, 501);

    let h = Harness::new(ScimSimConfig {
        bulk: Some(rostersync_sim::scim::SimBulk {
            max_operations: 3,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let spc = h.get("/ServiceProviderConfig").await.body;
    assert_eq!(spc["bulk"]["supported"], true);
    assert_eq!(spc["bulk"]["maxOperations"], 3);
    let user = |name: &str, extra: Value| {
        let mut u = json!({"schemas": [CORE, ENT], "userName": name});
        if let (Some(o), Some(e)) = (u.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        u
    };
    let r = h
        .post(
            "/Bulk",
            json!({"schemas": [BULK_REQUEST], "Operations": [
                {"method": "POST", "bulkId": "boss", "path": "/Users", "data": user("boss@x", json!({}))},
                {"method": "POST", "bulkId": "rep", "path": "/Users",
                 "data": user("rep@x", json!({ENT: {"manager": {"value": "bulkId:boss"}}}))},
                {"method": "POST", "bulkId": "orphan", "path": "/Users",
                 "data": user("orphan@x", json!({ENT: {"manager": {"value": "bulkId:nobody"}}}))},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ops = r.body["Operations"].as_array().expect("Operations");
    let statuses: Vec<&str> = ops.iter().map(|o| o["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["201", "201", "409"]);
    assert_eq!(ops[2]["response"]["scimType"], "invalidValue");
    let boss_id = ops[0]["location"]
        .as_str()
        .and_then(|l| l.rsplit('/').next())
        .expect("location")
        .to_string();
    let rep = h.filter("userName eq \"rep@x\"").await.body["Resources"][0].clone();
    assert_eq!(rep[ENT]["manager"]["value"], boss_id, "bulkId resolved");

    // failOnErrors = 1: the first failure ends the request.
    let r = h
        .post(
            "/Bulk",
            json!({"schemas": [BULK_REQUEST], "failOnErrors": 1, "Operations": [
                {"method": "POST", "bulkId": "dup", "path": "/Users", "data": user("boss@x", json!({}))},
                {"method": "POST", "bulkId": "new", "path": "/Users", "data": user("new@x", json!({}))},
            ]}),
        )
        .await;
    let ops = r.body["Operations"].as_array().expect("Operations");
    assert_eq!(ops.len(), 1, "{}", r.body);
    assert_eq!(ops[0]["status"], "409");
    assert_eq!(
        h.filter("userName eq \"new@x\"").await.body["totalResults"],
        0
    );

    // More than maxOperations: refused whole.
    let many: Vec<Value> = (0..4)
        .map(|i| json!({"method": "POST", "bulkId": format!("m{i}"), "path": "/Users", "data": user(&format!("m{i}@x"), json!({}))}))
        .collect();
    let r = h
        .post(
            "/Bulk",
            json!({"schemas": [BULK_REQUEST], "Operations": many}),
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(
        h.filter("userName eq \"m0@x\"").await.body["totalResults"],
        0
    );
}
