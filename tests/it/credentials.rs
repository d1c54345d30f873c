//! Secretless credentials against the simulated token endpoint: certificates (PS256 with
//! `x5t#S256`, RS256 with `x5t`) and workload identity federation (a Kubernetes-style token
//! file), each refused with Entra's AADSTS codes and rostersync's advice when something is off.

use std::path::Path;

use crate::common::{upn, TestEnv, SCIM_TOKEN};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rostersync::app::{CheckStatus, Integration};
use rostersync::config::Config;
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::graph::credential::{
    Certificate, CertificateAlg, CertificateCredential, ClientCredential,
};
use rostersync::graph::{GraphClient, GraphError, GraphSettings};
use rostersync::store::Store;
use rostersync::sync::reconcile::RunOutcome;
use rostersync_sim::graph::{
    fixture, sign_federated_token, FederatedCredential, GraphSim, TEST_KUBE_ISSUER,
    TOKEN_EXCHANGE_AUDIENCE,
};
use rostersync_sim::keys;
use rostersync_sim::scim::{ScimSim, ScimSimConfig};
use secrecy::SecretString;
use serde_json::{json, Value};

const CERTIFICATE_LINES: &str = "credential = \"certificate\"\ncertificate = \"app.crt.pem\"\ncertificate_key = { file = \"app.key.pem\" }";
const WORKLOAD_LINES: &str =
    "credential = \"workload_identity\"\nfederated_token_file = \"tokens/azure-identity-token\"";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:lms-sync:rostersync";

/// The usual simulated tenant and LMS, with the config's `client_secret` line replaced by
/// `credential_lines`; `files` are written into the config's folder first.
async fn spawn_with(
    credential_lines: &str,
    files: &[(&str, &str)],
    prepare: impl FnOnce(&GraphSim),
) -> TestEnv {
    let fx = fixture(40, 11);
    let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
    prepare(&graph);
    let scim = ScimSim::start(ScimSimConfig {
        token: SCIM_TOKEN.into(),
        custom_extension: Some(demo_custom_extension()),
        ..Default::default()
    })
    .await
    .expect("scim sim");
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let text = sim_config_toml(
        "test",
        &graph,
        &fx.tenant,
        &fx.all_group_id,
        &scim,
        SCIM_TOKEN,
    );
    let secret_line = format!(
        "client_secret = {{ value = \"{}\" }}",
        fx.tenant.client_secret
    );
    assert!(text.contains(&secret_line), "{text}");
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n{}",
        dir.path().join("data").display(),
        text.replace(&secret_line, credential_lines)
    );
    let config = Config::from_toml(&text, dir.path()).expect("config");
    let store = Store::temporary().unwrap();
    let integration = Integration::build(&config.integrations[0], &store).unwrap();
    TestEnv {
        graph,
        scim,
        fx,
        store,
        integration,
        config_toml: text,
        dir,
    }
}

async fn certificate_env() -> TestEnv {
    spawn_with(
        CERTIFICATE_LINES,
        &[
            ("app.crt.pem", keys::APP_CERT_PEM),
            ("app.key.pem", keys::APP_KEY_PEM),
        ],
        |g| g.add_app_certificate(keys::APP_CERT_PEM).unwrap(),
    )
    .await
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A projected service-account token as the kubelet writes it.
fn kube_token(key_pem: &str, issuer: &str, subject: &str, audience: &str, exp: i64) -> String {
    let t = sign_federated_token(
        key_pem,
        &json!({
            "aud": [audience],
            "exp": exp,
            "iat": now(),
            "nbf": now(),
            "iss": issuer,
            "jti": uuid::Uuid::new_v4().to_string(),
            "sub": subject,
            "kubernetes.io": {
                "namespace": "lms-sync",
                "serviceaccount": {"name": "rostersync", "uid": "2b4d6f8a-1c3e-4a5b-9d7f-0e1c2b3a4d5e"}
            },
        }),
    );
    assert!(!t.is_empty());
    t
}

fn good_kube_token() -> String {
    kube_token(
        keys::KUBE_ISSUER_KEY_PEM,
        TEST_KUBE_ISSUER,
        SERVICE_ACCOUNT,
        TOKEN_EXCHANGE_AUDIENCE,
        now() + 3600,
    )
}

fn trust_the_test_cluster(g: &GraphSim) {
    g.add_federated_credential(FederatedCredential {
        issuer: TEST_KUBE_ISSUER.into(),
        subject: SERVICE_ACCOUNT.into(),
        audience: TOKEN_EXCHANGE_AUDIENCE.into(),
        issuer_key_pem: keys::KUBE_ISSUER_PUBLIC_PEM.into(),
    })
    .unwrap();
}

async fn workload_env(token: &str) -> TestEnv {
    spawn_with(
        WORKLOAD_LINES,
        &[("tokens/azure-identity-token", token)],
        trust_the_test_cluster,
    )
    .await
}

fn token_file(env: &TestEnv) -> std::path::PathBuf {
    env.dir.path().join("tokens/azure-identity-token")
}

/// The AADSTS code and advice of a refused token request.
async fn refusal(env: &TestEnv) -> (u64, String) {
    match env.integration.graph.token().await {
        Err(GraphError::Auth {
            code: Some(code),
            advice,
        }) => (code, advice),
        Err(other) => panic!("expected an AADSTS refusal, got {other}"),
        Ok(_) => panic!("expected an AADSTS refusal, got a token"),
    }
}

fn last_assertion(env: &TestEnv) -> Value {
    env.graph
        .last_client_assertion()
        .expect("an accepted client assertion")
}

#[tokio::test]
async fn a_certificate_with_ps256_gets_a_token_and_a_reconcile_works() {
    let env = certificate_env().await;
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert!(r.counts.created > 20, "{:?}", r.counts);
    env.assert_lms_matches_tenant(upn);

    let a = last_assertion(&env);
    assert_eq!(a["kind"], "certificate");
    let (h, c) = (&a["header"], &a["claims"]);
    assert_eq!(h["alg"], "PS256");
    assert_eq!(h["typ"], "JWT");
    assert_eq!(h["x5t#S256"], keys::APP_CERT_X5T_S256);
    assert!(h.get("x5t").is_none(), "{h}");
    assert_eq!(c["aud"], env.graph.token_url().as_str());
    assert_eq!(c["iss"], env.fx.tenant.client_id.as_str());
    assert_eq!(c["sub"], env.fx.tenant.client_id.as_str());
    let (nbf, iat, exp) = (
        c["nbf"].as_i64().unwrap(),
        c["iat"].as_i64().unwrap(),
        c["exp"].as_i64().unwrap(),
    );
    assert!((nbf - now()).abs() < 60 && iat == nbf, "{c}");
    assert!(exp > nbf && exp - nbf <= 600, "{c}");
    assert!(
        uuid::Uuid::parse_str(c["jti"].as_str().unwrap()).is_ok(),
        "{c}"
    );

    // Token refresh signs a new assertion (the sim refuses a jti it has seen).
    let tokens = env.graph.request_count("token");
    env.graph.expire_tokens();
    let again = env.reconcile().await;
    assert_eq!(again.outcome, RunOutcome::Ok, "{:?}", again.error);
    assert_eq!(env.graph.request_count("token"), tokens + 1);
    assert_ne!(last_assertion(&env)["claims"]["jti"], c["jti"]);

    let lines = env.integration.check().await;
    let token_line = lines.iter().find(|l| l.what == "Graph token").unwrap();
    assert_eq!(token_line.status, CheckStatus::Ok, "{}", token_line.detail);
    assert!(
        token_line.detail.contains(keys::APP_CERT_SHA1_HEX) && token_line.detail.contains("PS256"),
        "{}",
        token_line.detail
    );
}

#[tokio::test]
async fn rs256_with_an_x5t_header_works_from_a_combined_pem_file() {
    let combined = format!("{}{}", keys::APP_KEY_PKCS1_PEM, keys::APP_CERT_PEM);
    let env = spawn_with(
        "credential = \"certificate\"\ncertificate_alg = \"RS256\"\ncertificate = \"app.pem\"\ncertificate_key = { file = \"app.pem\" }",
        &[("app.pem", &combined)],
        |g| g.add_app_certificate(keys::APP_CERT_PEM).unwrap(),
    )
    .await;
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    let h = &last_assertion(&env)["header"];
    assert_eq!(h["alg"], "RS256");
    assert_eq!(h["x5t"], keys::APP_CERT_X5T);
    assert!(h.get("x5t#S256").is_none(), "{h}");
}

#[tokio::test]
async fn a_signature_by_another_key_is_refused_with_the_advice() {
    // Config refuses a key that does not match its certificate, so build the client directly.
    let env = certificate_env().await;
    let mismatched = CertificateCredential::new(
        Certificate::from_pem(keys::APP_CERT_PEM).unwrap(),
        &SecretString::from(keys::FORGER_KEY_PEM.to_string()),
        CertificateAlg::Ps256,
    )
    .unwrap();
    let client = GraphClient::new(
        GraphSettings {
            tenant_id: env.fx.tenant.tenant_id.clone(),
            client_id: env.fx.tenant.client_id.clone(),
            credential: ClientCredential::Certificate(mismatched),
            login_url: env.graph.login_url().parse().unwrap(),
            graph_url: env.graph.graph_url().parse().unwrap(),
        },
        GraphClient::default_http().unwrap(),
    );
    let tokens = env.graph.request_count("token");
    match client.token().await {
        Err(GraphError::Auth { code, advice }) => {
            assert_eq!(code, Some(700027));
            assert!(
                advice.contains("AADSTS700027")
                    && advice.contains("Upload `certificate`")
                    && advice.contains("certificate_key")
                    && advice.contains(keys::APP_CERT_SHA1_HEX),
                "{advice}"
            );
            assert!(!advice.contains("PRIVATE KEY"), "{advice}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| "a token")),
    }
    // Refusals are not retried.
    assert_eq!(env.graph.request_count("token"), tokens + 1);
}

#[tokio::test]
async fn an_unregistered_certificate_fails_the_check_and_the_run_with_its_thumbprint() {
    let env = spawn_with(
        CERTIFICATE_LINES,
        &[
            ("app.crt.pem", keys::UNREGISTERED_CERT_PEM),
            ("app.key.pem", keys::FORGER_KEY_PEM),
        ],
        |g| g.add_app_certificate(keys::APP_CERT_PEM).unwrap(),
    )
    .await;
    let lines = env.integration.check().await;
    let token_line = lines.iter().find(|l| l.what == "Graph token").unwrap();
    assert_eq!(token_line.status, CheckStatus::Fail);
    assert!(
        token_line.detail.contains("AADSTS700027")
            && token_line
                .detail
                .contains("7C8FF60DED18EEBC492CE9B3966A30F0D074DF7A"),
        "{}",
        token_line.detail
    );
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Failed);
    assert!(
        r.error.as_deref().unwrap_or("").contains("AADSTS700027"),
        "{:?}",
        r.error
    );
    assert!(env.scim.users().is_empty());
}

#[tokio::test]
async fn a_clock_off_by_an_hour_either_way_is_refused_with_the_advice() {
    let env = certificate_env().await;
    for offset in [3600, -3600] {
        env.graph.set_token_clock_offset_secs(offset);
        let (code, advice) = refusal(&env).await;
        assert_eq!(code, 700024, "offset {offset}: {advice}");
        assert!(advice.contains("clock"), "{advice}");
    }
    // Within the tolerated skew it works.
    env.graph.set_token_clock_offset_secs(120);
    assert!(env.integration.graph.token().await.is_ok());
}

/// The sim's own checks, with hand-made assertions posted straight to the token endpoint.
#[tokio::test]
async fn the_token_endpoint_checks_every_part_of_a_certificate_assertion() {
    let env = certificate_env().await;
    let (client_id, url) = (env.fx.tenant.client_id.clone(), env.graph.token_url());
    let http = reqwest::Client::new();
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = json!({
            "aud": url, "iss": client_id, "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now(), "iat": now(), "exp": now() + 600,
        });
        f(&mut c);
        c
    };
    let sign = |alg: Algorithm, x5t_s256: Option<&str>, x5t: Option<&str>, key: &str, c: &Value| {
        let mut h = Header::new(alg);
        h.x5t_s256 = x5t_s256.map(String::from);
        h.x5t = x5t.map(String::from);
        jsonwebtoken::encode(&h, c, &EncodingKey::from_rsa_pem(key.as_bytes()).unwrap()).unwrap()
    };
    let ps = |c: &Value| {
        sign(
            Algorithm::PS256,
            Some(keys::APP_CERT_X5T_S256),
            None,
            keys::APP_KEY_PEM,
            c,
        )
    };
    let post = |form: Vec<(&'static str, String)>| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.post(&url).form(&form).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let form = |assertion: String| {
        vec![
            ("client_id", client_id.clone()),
            ("scope", format!("{}/.default", env.graph.graph_url())),
            ("grant_type", "client_credentials".to_string()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
            ),
            ("client_assertion", assertion),
        ]
    };

    let good = ps(&claims(&|_| {}));
    let (status, body) = post(form(good.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].is_string());

    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&|_| {}),
        &EncodingKey::from_secret(b"not a certificate"),
    )
    .unwrap();
    let cases: Vec<(&str, String, u16, u64, &str)> = vec![
        ("replayed jti", good, 401, 50013, "already used"),
        (
            "wrong audience",
            ps(&claims(&|c| {
                c["aud"] = json!("https://login.microsoftonline.com/x/oauth2/v2.0/token")
            })),
            401,
            50013,
            "audience",
        ),
        (
            "sub is not the client",
            ps(&claims(&|c| {
                c["sub"] = json!("9a2b3c4d-0000-4000-8000-000000000001")
            })),
            401,
            700021,
            "client_id",
        ),
        (
            "expired",
            ps(&claims(&|c| {
                c["exp"] = json!(now() - 3600);
                c["nbf"] = json!(now() - 4200);
                c["iat"] = json!(now() - 4200)
            })),
            401,
            700024,
            "valid time range",
        ),
        (
            "not yet valid",
            ps(&claims(&|c| {
                c["nbf"] = json!(now() + 3600);
                c["iat"] = json!(now() + 3600);
                c["exp"] = json!(now() + 4200)
            })),
            401,
            700024,
            "valid time range",
        ),
        (
            "no exp",
            ps(&claims(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            400,
            50027,
            "exp",
        ),
        (
            "no jti",
            ps(&claims(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            })),
            400,
            50027,
            "jti",
        ),
        (
            "signed by another key",
            sign(
                Algorithm::PS256,
                Some(keys::APP_CERT_X5T_S256),
                None,
                keys::FORGER_KEY_PEM,
                &claims(&|_| {}),
            ),
            401,
            700027,
            "signature validation",
        ),
        (
            "unregistered x5t#S256",
            sign(
                Algorithm::PS256,
                Some(keys::UNREGISTERED_CERT_X5T_S256),
                None,
                keys::FORGER_KEY_PEM,
                &claims(&|_| {}),
            ),
            401,
            700027,
            "not registered",
        ),
        (
            "wrong x5t",
            sign(
                Algorithm::RS256,
                None,
                Some("AAAAAAAAAAAAAAAAAAAAAAAAAAA"),
                keys::APP_KEY_PEM,
                &claims(&|_| {}),
            ),
            401,
            700027,
            "not registered",
        ),
        (
            "no thumbprint",
            sign(
                Algorithm::PS256,
                None,
                None,
                keys::APP_KEY_PEM,
                &claims(&|_| {}),
            ),
            401,
            700027,
            "x5t",
        ),
        ("HS256", hs, 400, 50027, "HS256"),
        (
            "not a JWT",
            "not-a-jwt".to_string(),
            400,
            50027,
            "malformed",
        ),
    ];
    for (what, assertion, want_status, code, words) in cases {
        let (status, body) = post(form(assertion)).await;
        assert_eq!(status, want_status, "{what}: {body}");
        let desc = body["error_description"].as_str().unwrap_or("");
        assert!(
            desc.starts_with(&format!("AADSTS{code}:")),
            "{what}: {body}"
        );
        assert!(desc.contains(words), "{what}: {body}");
        assert_eq!(body["error_codes"], json!([code]), "{what}");
        assert!(
            body["error"].is_string() && body["trace_id"].is_string(),
            "{what}: {body}"
        );
    }

    // A secret and an assertion together, or another assertion type, are refused.
    let mut both = form(ps(&claims(&|_| {})));
    both.push(("client_secret", env.fx.tenant.client_secret.clone()));
    assert_eq!(post(both).await.0, 400);
    let mut saml = form(ps(&claims(&|_| {})));
    saml[3].1 = "urn:ietf:params:oauth:client-assertion-type:saml2-bearer".into();
    let (status, body) = post(saml).await;
    assert_eq!(
        (status, &body["error_codes"]),
        (400, &json!([90014])),
        "{body}"
    );
}

#[tokio::test]
async fn workload_identity_with_a_valid_token_file_reconciles() {
    let token = good_kube_token();
    let env = workload_env(&token).await;
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    env.assert_lms_matches_tenant(upn);
    let a = last_assertion(&env);
    assert_eq!(a["kind"], "federated");
    assert_eq!(a["claims"]["sub"], SERVICE_ACCOUNT);

    let lines = env.integration.check().await;
    let token_line = lines.iter().find(|l| l.what == "Graph token").unwrap();
    assert_eq!(token_line.status, CheckStatus::Ok);
    assert!(
        token_line.detail.contains("workload identity")
            && token_line.detail.contains("azure-identity-token"),
        "{}",
        token_line.detail
    );
}

#[tokio::test]
async fn federated_tokens_that_do_not_match_the_federated_credential_are_refused() {
    let env = workload_env(&good_kube_token()).await;
    let file = token_file(&env);
    let k = keys::KUBE_ISSUER_KEY_PEM;
    let later = now() + 3600;
    let cases = [
        (
            "audience",
            kube_token(
                k,
                TEST_KUBE_ISSUER,
                SERVICE_ACCOUNT,
                "api://some-other-audience",
                later,
            ),
            700212,
        ),
        (
            "issuer",
            kube_token(
                k,
                "https://oidc.other.example/",
                SERVICE_ACCOUNT,
                TOKEN_EXCHANGE_AUDIENCE,
                later,
            ),
            700211,
        ),
        (
            "subject",
            kube_token(
                k,
                TEST_KUBE_ISSUER,
                "system:serviceaccount:default:default",
                TOKEN_EXCHANGE_AUDIENCE,
                later,
            ),
            700213,
        ),
        (
            "signature",
            kube_token(
                keys::FORGER_KEY_PEM,
                TEST_KUBE_ISSUER,
                SERVICE_ACCOUNT,
                TOKEN_EXCHANGE_AUDIENCE,
                later,
            ),
            700027,
        ),
        (
            "expiry",
            kube_token(
                k,
                TEST_KUBE_ISSUER,
                SERVICE_ACCOUNT,
                TOKEN_EXCHANGE_AUDIENCE,
                now() - 3600,
            ),
            700024,
        ),
    ];
    for (what, token, want) in cases {
        std::fs::write(&file, &token).unwrap();
        let (code, advice) = refusal(&env).await;
        assert_eq!(code, want, "wrong {what}: {advice}");
        if (700211..=700213).contains(&code) {
            assert!(
                advice.contains("federated credential")
                    && advice.contains(TOKEN_EXCHANGE_AUDIENCE)
                    && advice.contains(what),
                "wrong {what}: {advice}"
            );
        }
    }
    // The same file, fixed, works again without a restart.
    std::fs::write(&file, good_kube_token()).unwrap();
    assert!(env.integration.graph.token().await.is_ok());
}

#[tokio::test]
async fn an_app_without_federated_credentials_answers_70021() {
    let env = spawn_with(
        WORKLOAD_LINES,
        &[("tokens/azure-identity-token", &good_kube_token())],
        |_| {},
    )
    .await;
    let (code, advice) = refusal(&env).await;
    assert_eq!(code, 70021, "{advice}");
    assert!(
        advice.contains("no matching federated identity credential"),
        "{advice}"
    );
}

#[tokio::test]
async fn a_missing_or_empty_token_file_is_a_clear_error_naming_the_path() {
    let env = workload_env(&good_kube_token()).await;
    let file = token_file(&env);
    std::fs::remove_file(&file).unwrap();
    let tokens = env.graph.request_count("token");
    let e = env.integration.graph.token().await.unwrap_err().to_string();
    assert!(
        e.contains(&file.display().to_string()) && e.contains("does not exist"),
        "{e}"
    );
    let lines = env.integration.check().await;
    let token_line = lines.iter().find(|l| l.what == "Graph token").unwrap();
    assert_eq!(token_line.status, CheckStatus::Fail);
    assert!(
        token_line.detail.contains(&file.display().to_string()),
        "{}",
        token_line.detail
    );
    std::fs::write(&file, "").unwrap();
    let e = env.integration.graph.token().await.unwrap_err().to_string();
    assert!(
        e.contains(&file.display().to_string()) && e.contains("empty"),
        "{e}"
    );
    assert_eq!(
        env.graph.request_count("token"),
        tokens,
        "nothing is sent without a token"
    );
}

#[tokio::test]
async fn a_rotated_token_file_is_read_at_the_next_token_request() {
    let first = kube_token(
        keys::KUBE_ISSUER_KEY_PEM,
        TEST_KUBE_ISSUER,
        SERVICE_ACCOUNT,
        TOKEN_EXCHANGE_AUDIENCE,
        now() + 600,
    );
    let env = workload_env(&first).await;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    let first_jti = last_assertion(&env)["claims"]["jti"].clone();

    // The kubelet writes a new token; the old one expires (an hour passes at the sim).
    let second = kube_token(
        keys::KUBE_ISSUER_KEY_PEM,
        TEST_KUBE_ISSUER,
        SERVICE_ACCOUNT,
        TOKEN_EXCHANGE_AUDIENCE,
        now() + 7200,
    );
    std::fs::write(token_file(&env), &second).unwrap();
    env.graph.set_token_clock_offset_secs(3600);
    env.graph.expire_tokens();
    let tokens = env.graph.request_count("token");
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    assert_eq!(env.graph.request_count("token"), tokens + 1);
    let used = last_assertion(&env)["claims"]["jti"].clone();
    assert_ne!(used, first_jti);
    let second_claims: Value = {
        use base64::Engine;
        let part = second.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(used, second_claims["jti"]);
}

#[tokio::test]
async fn the_token_file_defaults_to_azure_federated_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("azure-identity-token");
    std::fs::write(&path, good_kube_token()).unwrap();
    // Only this test reads the variable: every other config in these tests names its file.
    std::env::set_var("AZURE_FEDERATED_TOKEN_FILE", &path);
    let env = spawn_with(
        "credential = \"workload_identity\"",
        &[],
        trust_the_test_cluster,
    )
    .await;
    assert!(matches!(
        &env.integration.cfg.credential,
        ClientCredential::WorkloadIdentity { token_file } if token_file == &path
    ));
    assert!(env.integration.graph.token().await.is_ok());
    assert!(Path::new(&path).exists());
}
