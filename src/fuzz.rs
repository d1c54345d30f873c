//! Property-based fuzz targets (proptest, stable Rust) for everything that reads input from
//! outside: the webhook's notification parser and handshake, `validationTokens`, Graph and SCIM
//! responses, the SCIM filter builder, the config loader and the webhook journal's replay.
//!
//! Invariants: no panic; bounded work and memory (bodies are capped before they are read and
//! element counts while they are read; replay is linear in the file); a rejected input changes
//! no store key; secrets never appear in an error.
//!
//! The journal's targets live in `store::journal::fuzz_tests`. Each target runs a fixed small
//! number of cases in `cargo test` (all of them together take well under a minute on two
//! cores). For a longer run, raise the count for every target (the filter `fuzz` takes both
//! modules):
//!
//! ```text
//! PROPTEST_CASES=20000 cargo test --release --lib fuzz
//! ```
//!
//! (`PROPTEST_CASES` replaces each target's default; a failing case is shrunk and printed, and
//! its seed saved under `proptest-regressions/`.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `default` cases, or `PROPTEST_CASES` when set.
pub(crate) fn config(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        max_shrink_iters: 2000,
        ..Config::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

// ---- strategies -------------------------------------------------------------------------

/// Strings that mean something to our parsers, and hostile ones.
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        1 => Just(String::new()),
        1 => Just("\n2030-01-01T00:00:00Z  INFO forged\r".to_string()),
        1 => Just("\u{1b}[31m\u{2028}".to_string()),
        1 => Just("\"\\'%00%0a%".to_string()),
        1 => "[a-f0-9-]{36}".prop_map(|s| s),
        1 => Just("a".repeat(5000)),
    ]
}

/// Object keys: the names our parsers look for, mixed with any string.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<String>(),
        3 => prop::sample::select(vec![
            "value", "id", "@odata.type", "@odata.nextLink", "@odata.deltaLink",
            "members@delta", "@removed", "responses", "status", "body", "headers",
            "access_token", "expires_in", "error", "error_description", "error_codes",
            "Resources", "totalResults", "userName", "externalId", "active", "name",
            "emails", "type", "detail", "scimType", "patch", "supported", "filter",
            "subscriptionId", "clientState", "tenantId", "organizationId", "lifecycleEvent",
            "resource", "resourceData", "validationTokens", "userPrincipalName",
            "displayName", "manager", "code", "message", "issuer", "token_endpoint",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User",
        ])
        .prop_map(str::to_string),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        word().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Bytes a peer might send: JSON documents, near-JSON, or noise.
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        1 => prop::collection::vec(any::<u8>(), 0..2048),
        1 => (json_value(), any::<usize>()).prop_map(|(v, cut)| {
            let b = serde_json::to_vec(&v).unwrap_or_default();
            let n = if b.is_empty() { 0 } else { cut % b.len() };
            b[..n].to_vec()
        }),
    ]
}

// ---- the webhook ------------------------------------------------------------------------

mod webhook {
    use super::*;
    use crate::webhook::test_support::*;
    use crate::webhook::{handshake, process};

    /// One notification assembled from right and wrong parts.
    fn notification() -> impl Strategy<Value = (Value, bool)> {
        (
            prop_oneof![
                Just(Some(CLIENT_STATE.to_string())),
                word().prop_map(Some),
                Just(None)
            ],
            prop_oneof![
                Just(Some(USERS_SUB.to_string())),
                Just(Some(GROUP_SUB.to_string())),
                word().prop_map(Some),
                Just(None)
            ],
            prop_oneof![
                Just(Some(TENANT.to_string())),
                word().prop_map(Some),
                Just(None)
            ],
            prop_oneof![Just(None), word().prop_map(Some)],
            prop_oneof![
                Just(Some("4d147cc8-10cb-4158-ac52-90ee8ff9d846".to_string())),
                word().prop_map(Some),
                Just(None)
            ],
            prop::collection::vec((key(), json_value()), 0..3),
        )
            .prop_map(|(cs, sub, tenant, event, user, extra)| {
                let mut m = serde_json::Map::new();
                for (k, v) in extra {
                    m.insert(k, v);
                }
                let mut put = |k: &str, v: Option<String>| match v {
                    Some(v) => {
                        m.insert(k.into(), json!(v));
                    }
                    None => {
                        m.remove(k);
                    }
                };
                let genuine = cs.as_deref() == Some(CLIENT_STATE)
                    && tenant.as_deref() == Some(TENANT)
                    && matches!(sub.as_deref(), Some(USERS_SUB) | Some(GROUP_SUB));
                put("clientState", cs);
                put("subscriptionId", sub);
                put("tenantId", tenant);
                put("lifecycleEvent", event);
                if let Some(u) = user {
                    m.insert("resourceData".into(), json!({ "id": u }));
                }
                (Value::Object(m), genuine)
            })
    }

    proptest! {
        #![proptest_config(config(384))]

        /// Arbitrary bytes and queries: never a panic, never a queued item, never a changed
        /// store key (nothing in them knows the clientState).
        #[test]
        fn arbitrary_bodies_change_nothing(body in body_bytes(), query in prop_oneof![
            Just(String::new()), any::<String>(), word().prop_map(|w| format!("validationToken={w}"))
        ], unknown in any::<bool>()) {
            let f = fixture();
            let before = f.store.digest();
            let name = if unknown { "stranger" } else { NAME };
            let (reply, log) = logged(process(&f.state, name, &query, &body));
            prop_assert!([200, 202, 400, 403, 404].contains(&reply.status), "{reply:?}");
            prop_assert_eq!(f.store.digest(), before);
            prop_assert!(log.lines().count() <= 1, "{}", log);
            prop_assert!(!log.contains('\r'));
        }

        /// Batches mixing genuine and forged notifications: a refused request changes no
        /// store key; an accepted one queues at most its genuine notifications.
        #[test]
        fn mixed_batches_queue_only_genuine_notifications(
            ns in prop::collection::vec(notification(), 0..12),
            tokens in prop_oneof![Just(None), prop::collection::vec(word(), 0..3).prop_map(Some)],
        ) {
            let f = fixture();
            let before = f.store.digest();
            let genuine = ns.iter().filter(|(_, g)| *g).count();
            let mut doc = json!({ "value": ns.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>() });
            if let Some(t) = tokens {
                doc["validationTokens"] = json!(t);
            }
            let body = serde_json::to_vec(&doc).unwrap();
            let (reply, log) = logged(process(&f.state, NAME, "", &body));
            prop_assert!([202, 400, 403, 503].contains(&reply.status), "{reply:?}");
            if reply.status != 202 {
                prop_assert_eq!(f.store.digest(), before);
            }
            prop_assert!(f.integ.queue_len() <= genuine);
            prop_assert!(log.lines().filter(|l| l.contains("WARN")).count() <= 2, "{}", log);
        }

        /// The handshake parser on any query: an echoed token is short printable ASCII.
        #[test]
        fn handshake_echoes_only_short_printable_tokens(query in prop_oneof![
            any::<String>(),
            any::<String>().prop_map(|t| format!("validationToken={t}")),
            prop::collection::vec(any::<u8>(), 0..3000).prop_map(|b| format!(
                "validationToken={}",
                percent_encoding::percent_encode(&b, percent_encoding::NON_ALPHANUMERIC)
            )),
        ]) {
            if let handshake::TokenCheck::Echo(t) = handshake::validation_token(&query) {
                prop_assert!(!t.is_empty() && t.len() <= handshake::MAX_TOKEN_CHARS);
                prop_assert!(t.bytes().all(|b| (0x20..0x7f).contains(&b)));
            }
        }

        /// Every printable token Graph could send survives the round trip exactly.
        #[test]
        fn handshake_round_trips_printable_tokens(t in "[ -~]{1,1024}") {
            let q = format!(
                "validationToken={}",
                url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
            );
            prop_assert_eq!(handshake::validation_token(&q), handshake::TokenCheck::Echo(t));
        }
    }
}

// ---- validationTokens -------------------------------------------------------------------

mod validation_tokens {
    use super::*;
    use crate::webhook::tokens::{
        Cloud, JwksCache, TokenExpectation, GRAPH_CHANGE_TRACKING_APP_ID,
    };
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
    use rostersync_sim::keys::{KEY_E, SIGNING_KEY_N, SIGNING_KEY_PEM, SIGNING_KID};

    const TENANT: &str = "7a4f1c2e-0b9d-4e6a-8c3f-2d1e5b6a7c8d";
    const CLIENT: &str = "11111111-2222-3333-4444-555555555555";

    fn cache() -> JwksCache {
        let mut keys = HashMap::new();
        keys.insert(
            SIGNING_KID.to_string(),
            DecodingKey::from_rsa_components(SIGNING_KEY_N, KEY_E).unwrap(),
        );
        JwksCache::preloaded(keys)
    }

    fn expect() -> TokenExpectation {
        TokenExpectation {
            client_ids: vec![CLIENT.into()],
            tenant_id: TENANT.into(),
            cloud: Cloud::Global,
        }
    }

    fn genuine() -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "aud": CLIENT, "iss": format!("https://sts.windows.net/{TENANT}/"),
            "iat": now, "nbf": now, "exp": now + 3600, "ver": "1.0",
            "appid": GRAPH_CHANGE_TRACKING_APP_ID, "tid": TENANT,
        });
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(SIGNING_KID.into());
        jsonwebtoken::encode(
            &h,
            &claims,
            &EncodingKey::from_rsa_pem(SIGNING_KEY_PEM.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn b64(b: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    proptest! {
        #![proptest_config(config(384))]

        /// Any string, any three base64url parts of JSON, any mutation of a genuine token:
        /// rejected, without a panic; the genuine token itself passes.
        #[test]
        fn only_the_genuine_token_passes(
            noise in any::<String>(),
            header in json_value(), payload in json_value(), sig in prop::collection::vec(any::<u8>(), 0..300),
            at in any::<usize>(), byte in any::<u8>(),
        ) {
            let rt = runtime();
            let cache = cache();
            let good = genuine();
            let shaped = format!(
                "{}.{}.{}",
                b64(header.to_string().as_bytes()),
                b64(payload.to_string().as_bytes()),
                b64(&sig)
            );
            let mut mutated = good.clone().into_bytes();
            let i = at % mutated.len();
            mutated[i] = byte;
            let mutated = String::from_utf8_lossy(&mutated).into_owned();
            rt.block_on(async {
                for t in [noise, shaped] {
                    prop_assert!(cache.verify(&[t], &expect()).await.is_err());
                }
                if mutated != good {
                    prop_assert!(cache.verify(&[mutated], &expect()).await.is_err());
                }
                prop_assert!(cache.verify(&[good], &expect()).await.is_ok());
                Ok(())
            })?;
        }
    }
}

// ---- Graph and SCIM responses -------------------------------------------------------------

/// A local HTTP server that answers every request with the current `(status, body)`.
struct Canned {
    url: String,
    answer: Arc<Mutex<(u16, Vec<u8>)>>,
    hits: Arc<AtomicUsize>,
}

impl Canned {
    async fn start() -> Canned {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new((200u16, Vec::new())));
        let hits = Arc::new(AtomicUsize::new(0));
        let (a, h) = (answer.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (a, h) = (a.clone(), h.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = a.lock().unwrap().clone();
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(&body).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Canned {
            url: format!("http://{addr}"),
            answer,
            hits,
        }
    }

    fn set(&self, status: u16, body: Vec<u8>) {
        *self.answer.lock().unwrap() = (status, body);
    }
}

mod graph_responses {
    use super::*;
    use crate::graph::credential::ClientCredential;
    use crate::graph::{GraphClient, GraphSettings};
    use crate::retry::RetryPolicy;
    use secrecy::SecretString;

    #[test]
    fn graph_and_token_endpoint_answers_never_panic() {
        let rt = runtime();
        let server = rt.block_on(Canned::start());
        let settings = GraphSettings {
            tenant_id: "contoso.onmicrosoft.com".into(),
            client_id: "11111111-2222-3333-4444-555555555555".into(),
            credential: ClientCredential::Secret(SecretString::from("s3cret-value-x")),
            login_url: url::Url::parse(&server.url).unwrap(),
            graph_url: url::Url::parse(&server.url).unwrap(),
        };
        let one_try = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let mut runner = proptest::test_runner::TestRunner::new(config(160));
        let strategy = (
            body_bytes(),
            prop::sample::select(vec![200u16, 200, 200, 400, 401, 404, 410]),
        );
        runner
            .run(&strategy, |(body, status)| {
                server.set(status, body.clone());
                // A fresh client per case: the token cache starts empty.
                let g = GraphClient::new(settings.clone(), GraphClient::default_http().unwrap())
                    .with_retry(one_try);
                rt.block_on(async {
                    let token = g.token().await;
                    if let Err(e) = &token {
                        prop_assert!(!e.to_string().contains("s3cret-value-x"));
                    }
                    let _ = g.tenant_guid().await;
                    if token.is_ok() {
                        let root = format!("{}/v1.0", server.url);
                        let _ = g
                            .user_page(&format!("{root}/groups/g/transitiveMembers"))
                            .await;
                        let _ = g.group_delta("g", &format!("{root}/groups/delta")).await;
                        let _ = g.managers(&["a".into(), "b".into()], &["id".into()]).await;
                        let _ = g.group("g").await;
                        let _ = g.user("u", &["id".into()]).await;
                        let _ = g.nested_groups("g").await;
                        let _ = g.list_subscriptions().await;
                    }
                    Ok(())
                })
            })
            .unwrap();
        assert!(server.hits.load(Ordering::SeqCst) > 0);
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn graph_user_from_any_json(v in json_value()) {
            let _ = crate::graph::models::GraphUser::from_value(v);
        }
    }
}

mod scim_responses {
    use super::*;
    use crate::lms::scim::ScimTarget;
    use crate::lms::Target;
    use crate::retry::RetryPolicy;
    use secrecy::SecretString;
    use std::time::Duration;

    fn target(base: &str) -> ScimTarget {
        ScimTarget::new(
            &url::Url::parse(base).unwrap(),
            SecretString::from("scim-secret-token"),
            "urn:ietf:params:scim:schemas:extension:acme:2.0:User",
            2,
            Duration::from_secs(5),
        )
        .unwrap()
        .with_retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
    }

    #[test]
    fn lms_answers_never_panic() {
        let rt = runtime();
        let server = rt.block_on(Canned::start());
        let t = target(&format!("{}/scim/v2", server.url));
        let mut runner = proptest::test_runner::TestRunner::new(config(160));
        let strategy = (
            body_bytes(),
            prop::sample::select(vec![200u16, 200, 200, 201, 400, 404, 409, 500]),
        );
        runner
            .run(&strategy, |(body, status)| {
                server.set(status, body);
                rt.block_on(async {
                    for e in [
                        t.list(1, 10).await.err(),
                        t.get("u1").await.err(),
                        t.find_by_user_name("ada@contoso.example").await.err(),
                        t.find_by_external_id("4d147cc8").await.err(),
                        t.discover().await.err(),
                    ]
                    .into_iter()
                    .flatten()
                    {
                        prop_assert!(!e.to_string().contains("scim-secret-token"));
                    }
                    Ok(())
                })
            })
            .unwrap();
    }

    /// An LMS that answers the same page whatever the `startIndex` ends a listing after one
    /// repeated page instead of paging up to the listing's bound (millions of requests; the
    /// test above once spun for half an hour on such an answer).
    #[test]
    fn a_listing_of_a_server_that_ignores_start_index_ends() {
        let rt = runtime();
        let server = rt.block_on(Canned::start());
        let t = target(&format!("{}/scim/v2", server.url));
        server.set(
            200,
            serde_json::to_vec(&serde_json::json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                "totalResults": 1000,
                "Resources": [{"id": "u1", "userName": "ada@contoso.example"}]
            }))
            .unwrap(),
        );
        let l = rt.block_on(t.take_listing(0)).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn scim_user_from_any_json(v in json_value()) {
            let _ = target("http://lms.test/scim/v2").parse_user(&v);
        }

        /// The filter builder: the query decodes to `attr eq <JSON string>` whose literal is
        /// exactly the value, whatever the value holds (quotes, backslashes, `%`, `+`, `and`).
        #[test]
        fn eq_filter_round_trips(v in prop_oneof![
            any::<String>(),
            "[a-z\"\\\\%+&= ()]{0,40}(and|or|not)?[a-z\"\\\\ ]{0,10}",
        ]) {
            let path = crate::lms::scim::eq_filter_path("userName", &v);
            let q = path.strip_prefix("/Users?filter=").unwrap();
            prop_assert!(!q.contains(['&', '+', ' ', '#', '"']), "{}", q);
            let decoded = percent_encoding::percent_decode_str(q).decode_utf8().unwrap();
            let literal = decoded.strip_prefix("userName eq ").unwrap();
            let back: String = serde_json::from_str(literal).unwrap();
            prop_assert_eq!(back, v);
        }
    }

    /// The same filters read by an independent parser: the SCIM simulator finds exactly the
    /// user whose userName was asked for, among decoys that differ by one character.
    #[test]
    fn eq_filter_finds_exactly_the_user_in_the_simulator() {
        use rostersync_sim::scim::{ScimSim, ScimSimConfig};
        let rt = runtime();
        let sim = rt
            .block_on(ScimSim::start(ScimSimConfig {
                token: "sim-token".into(),
                ..Default::default()
            }))
            .unwrap();
        let t = ScimTarget::new(
            &url::Url::parse(&sim.base_url()).unwrap(),
            SecretString::from("sim-token"),
            "urn:ietf:params:scim:schemas:extension:acme:2.0:User",
            2,
            Duration::from_secs(5),
        )
        .unwrap();
        let http = reqwest::Client::new();
        let mut runner = proptest::test_runner::TestRunner::new(config(96));
        let n = AtomicUsize::new(0);
        let strategy = prop_oneof!["[a-zA-Z0-9\"\\\\%+&=() .@'-]{1,30}", "[^\\x00-\\x1f]{1,20}",];
        runner
            .run(&strategy, |v| {
                let i = n.fetch_add(1, Ordering::SeqCst);
                let name = format!("{v}#{i}");
                rt.block_on(async {
                    let mut ids = Vec::new();
                    for (k, user) in [name.clone(), format!("{name}x"), format!("x{name}")]
                        .into_iter()
                        .enumerate()
                    {
                        let r = http
                            .post(format!("{}/Users", sim.base_url()))
                            .bearer_auth("sim-token")
                            .json(&json!({
                                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                "userName": user, "externalId": format!("e{i}-{k}"),
                            }))
                            .send()
                            .await
                            .unwrap();
                        let created: Value = r.json().await.unwrap_or(Value::Null);
                        ids.push(created["id"].as_str().map(str::to_string));
                    }
                    let Some(want) = ids[0].clone() else {
                        // The simulator refused the name; nothing to look for.
                        return Ok(());
                    };
                    let found = t.find_by_user_name(&name).await.unwrap();
                    prop_assert_eq!(found.map(|u| u.id), Some(want));
                    Ok(())
                })
            })
            .unwrap();
    }
}

// ---- the config loader ----------------------------------------------------------------------

mod config_loader {
    use super::*;
    use crate::config::Config;

    const SECRETS: [&str; 3] = [
        "Sup3rS3cretClientValue",
        "ScimT0kenValueNeverShown",
        "Adm1nTokenValueNeverShown",
    ];

    fn base() -> String {
        format!(
            r#"[server]
listen = "127.0.0.1:0"
admin_token = {{ value = "{a}" }}

[[integration]]
name = "acme"
tenant_id = "7a4f1c2e-0b9d-4e6a-8c3f-2d1e5b6a7c8d"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = {{ value = "{c}" }}
groups = ["0bc7d487-fd6f-41a0-8362-71ec81074f11"]

[integration.target]
kind = "scim"
url = "https://lms.example/scim/v2"
token = {{ value = "{s}" }}
"#,
            c = SECRETS[0],
            s = SECRETS[1],
            a = SECRETS[2]
        )
    }

    #[test]
    fn the_base_config_loads() {
        Config::from_toml(&base(), std::path::Path::new(".")).unwrap();
    }

    proptest! {
        #![proptest_config(config(384))]

        #[test]
        fn any_text_is_an_error_or_a_config(text in any::<String>()) {
            let _ = Config::from_toml(&text, std::path::Path::new("."));
        }

        /// Edits of a valid config (insertions, deletions, replaced lines): an error never
        /// quotes a secret.
        #[test]
        fn errors_never_quote_secrets(
            at in any::<usize>(), cut in 0usize..40, insert in prop_oneof![
                any::<String>(), word(), Just("\"".into()), Just("[[integration]]\n".into()),
                Just("= { env = \"NOPE_NOT_SET\" }".into()), Just("\n".into()),
            ],
        ) {
            let mut text = base();
            let mut i = at % text.len();
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            let mut j = (i + cut).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            text.replace_range(i..j, &insert);
            if let Err(e) = Config::from_toml(&text, std::path::Path::new(".")) {
                let msg = e.to_string();
                for s in SECRETS {
                    // A secret the edit cut down to a prefix is still a secret.
                    prop_assert!(!msg.contains(&s[..12]), "{}", msg);
                }
            }
        }
    }
}

// ---- the webhook journal --------------------------------------------------------------------
// Its replay is fuzzed next to it, in `store::journal::fuzz_tests` (it needs the private
// record format).
