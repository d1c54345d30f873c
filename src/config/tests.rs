use super::credentials::resolve_credential;
use super::*;
use crate::graph::credential::{CertificateAlg, ClientCredential};
use crate::lms::dialect::DialectSettings;
use crate::mapping::UsernameSource;
use secrecy::ExposeSecret;
use std::path::Path;

const GOOD: &str = r#"
[server]
data_dir = "state"

[[integration]]
name = "contoso"
tenant_id = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = { value = "s3cr3t-value" }
groups = ["0bc7d487-fd6f-41a0-8362-71ec81074f11"]
username = "mail"
max_deactivations = 25

[integration.target]
kind = "scim"
url = "https://lms.example.com/scim/v2/"
token = { value = "scim-token" }
"#;

#[test]
fn a_valid_file_loads_with_defaults() {
    let c = Config::from_toml(GOOD, Path::new("/etc/rs")).unwrap();
    assert_eq!(c.server.data_dir, PathBuf::from("/etc/rs/state"));
    let i = &c.integrations[0];
    assert_eq!(i.name.as_str(), "contoso");
    assert_eq!(i.username, UsernameSource::Mail);
    assert_eq!(i.max_deactivations, DeactivationLimit::Count(25));
    assert_eq!(i.guard_window, chrono::Duration::hours(24));
    assert_eq!(i.login_url.as_str(), "https://login.microsoftonline.com/");
    assert_eq!(i.target.url.as_str(), "https://lms.example.com/scim/v2");
    assert_eq!(i.target.concurrency, DEFAULT_TARGET_CONCURRENCY);
    assert_eq!(i.target.throttle_wait_secs, 600);
    assert_eq!(secret_of(i), "s3cr3t-value");
    assert!(i.link_existing);
}

#[test]
fn the_scim_dialect_can_be_pinned_and_every_bad_value_names_its_key() {
    use crate::lms::dialect::{CaseRule, Clear, FilterAttr, PatchOp};
    let text = format!(
        "{GOOD}dialect = {{ patch_ops = [\"replace\"], clear = \"null\", put = false, filter = [\"userName\"], user_name_unique = \"case-sensitive\", email_type = false, not_kept = [\"displayName\"], no_patch = [\"externalId\"] }}\n"
    );
    let c = Config::from_toml(&text, Path::new("/etc/rs")).unwrap();
    let d = &c.integrations[0].target.dialect;
    assert_eq!(d.patch_ops, Some([PatchOp::Replace].into()));
    assert_eq!(d.clear, Some(Clear::Null));
    assert_eq!(d.put, Some(false));
    assert_eq!(d.filter, Some([FilterAttr::UserName].into()));
    assert_eq!(d.user_name_unique, Some(CaseRule::CaseSensitive));
    assert_eq!(d.email_type, Some(false));
    assert!(d.not_kept.contains("displayName") && d.no_patch.contains("externalId"));
    let plain = Config::from_toml(GOOD, Path::new("/etc/rs")).unwrap();
    assert_eq!(
        plain.integrations[0].target.dialect,
        DialectSettings::default(),
        "nothing pinned by default"
    );
    for (bad, key) in [
        ("patch_ops = [\"merge\"]", "target.dialect.patch_ops"),
        ("clear = \"blank\"", "target.dialect.clear"),
        ("filter = [\"email\"]", "target.dialect.filter"),
        (
            "user_name_unique = \"yes\"",
            "target.dialect.user_name_unique",
        ),
        ("not_kept = [\"a b\"]", "target.dialect.not_kept"),
        ("typo = true", "typo"),
    ] {
        let text = format!("{GOOD}dialect = {{ {bad} }}\n");
        let e = Config::from_toml(&text, Path::new("/etc/rs"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
}

fn secret_of(i: &IntegrationConfig) -> &str {
    match &i.credential {
        ClientCredential::Secret(s) => s.expose_secret(),
        other => panic!("expected a client secret, got {other:?}"),
    }
}

fn err_of(text: &str) -> String {
    Config::from_toml(text, Path::new("."))
        .unwrap_err()
        .to_string()
}

#[test]
fn serve_settings_are_validated_with_the_key_named() {
    let with = |extra: &str| {
        GOOD.replace(
            "username = \"mail\"",
            &format!("username = \"mail\"\n{extra}"),
        )
    };
    let c = Config::from_toml(
        &with("schedule = \"0 */15 * * * *\"\ntimezone = \"Australia/Sydney\""),
        Path::new("."),
    )
    .unwrap();
    let i = &c.integrations[0];
    assert_eq!(i.timezone, chrono_tz::Australia::Sydney);
    assert_eq!(i.subscription_minutes, MAX_SUBSCRIPTION_MINUTES);
    assert!(i.renew_before_minutes < i.subscription_minutes);
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    let e = err_of(&with("schedule = \"every day\""));
    assert!(e.starts_with("integration[0] (contoso).schedule:"), "{e}");
    let e = err_of(&with("timezone = \"Mars/Olympus\""));
    assert!(e.contains(".timezone:") && e.contains("IANA"), "{e}");
    let e = err_of(&with("subscription_minutes = 50000"));
    assert!(
        e.contains(".subscription_minutes:") && e.contains("41760"),
        "{e}"
    );
    let e = err_of(&with(
        "subscription_minutes = 60\nrenew_before_minutes = 60",
    ));
    assert!(e.contains(".renew_before_minutes:"), "{e}");
    let e = err_of(&with("guard_window = \"a day\""));
    assert!(e.contains(".guard_window:") && e.contains("24h"), "{e}");
    let e = err_of(&with("guard_window = \"31d\""));
    assert!(e.contains(".guard_window:") && e.contains("30 days"), "{e}");
    let c = Config::from_toml(&with("guard_window = \"90m\""), Path::new(".")).unwrap();
    assert_eq!(
        c.integrations[0].guard_window,
        chrono::Duration::minutes(90)
    );
    let e = err_of(&with("client_state = { value = \"short\" }"));
    assert!(
        e.contains(".client_state:") && !e.contains("short\""),
        "{e}"
    );
    let e = err_of(&GOOD.replacen("[server]", "[server]\nlisten = \"everywhere\"", 1));
    assert!(e.starts_with("server.listen:"), "{e}");
    let e = err_of(&GOOD.replacen(
        "[server]",
        "[server]\npublic_url = \"http://example.com\"",
        1,
    ));
    assert!(e.starts_with("server.public_url:"), "{e}");
}

#[test]
fn errors_name_the_key() {
    let e = err_of(&GOOD.replace("username = \"mail\"", "username = \"email\""));
    assert!(e.starts_with("integration[0] (contoso).username:"), "{e}");
    let e = err_of(&GOOD.replace("max_deactivations = 25", "max_deactivations = \"ten\""));
    assert!(e.contains("max_deactivations"), "{e}");
    let e = err_of(&GOOD.replace("name = \"contoso\"", "name = \"Contoso Ltd\""));
    assert!(e.starts_with("integration[0].name:"), "{e}");
    let e = err_of(&GOOD.replace("0bc7d487-fd6f-41a0-8362-71ec81074f11", "All Employees"));
    assert!(e.contains(".groups:") && e.contains("object id"), "{e}");
    let e = err_of(&GOOD.replace(
        "{ value = \"s3cr3t-value\" }",
        "{ env = \"RS_TEST_SURELY_UNSET\" }",
    ));
    assert!(
        e.contains("client_secret") && e.contains("RS_TEST_SURELY_UNSET"),
        "{e}"
    );
    let e = err_of(&GOOD.replace("https://lms.example.com", "http://lms.example.com"));
    assert!(e.contains("target.url") && e.contains("https"), "{e}");
    let e = err_of(&GOOD.replace("kind = \"scim\"", "kind = \"ldap\""));
    assert!(e.contains("target.kind"), "{e}");
    let e = err_of(&GOOD.replace("username = \"mail\"", "usernme = \"mail\""));
    assert!(e.contains("usernme"), "{e}");
}

#[test]
fn parse_errors_do_not_echo_secrets() {
    for bad in [
        GOOD.replace("{ value = \"s3cr3t-value\" }", "\"s3cr3t-value\""),
        GOOD.replace(
            "{ value = \"s3cr3t-value\" }",
            "{ valu = \"s3cr3t-value\" }",
        ),
        GOOD.replace("{ value = \"s3cr3t-value\" }", "{ value = \"s3cr3t-value }"),
    ] {
        let e = err_of(&bad);
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(e.contains("line 9") || e.contains("line 10"), "{e}");
    }
}

#[test]
fn secret_values_never_appear_in_debug_output() {
    let c = Config::from_toml(GOOD, Path::new(".")).unwrap();
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("s3cr3t-value") && !dbg.contains("scim-token"),
        "{dbg}"
    );
}

#[test]
fn secrets_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "from-file\n").unwrap();
    let text = GOOD.replace("{ value = \"s3cr3t-value\" }", "{ file = \"secret.txt\" }");
    let c = Config::from_toml(&text, dir.path()).unwrap();
    assert_eq!(secret_of(&c.integrations[0]), "from-file");
}

#[test]
fn the_shipped_example_is_valid() {
    std::env::set_var("CONTOSO_SECRET", "x");
    std::env::set_var("CONTOSO_SCIM_TOKEN", "y");
    let text = include_str!("../../config/example.toml");
    // The example's placeholder ids are zero GUIDs, which are well-formed.
    let c = Config::from_toml(text, Path::new("config")).unwrap();
    assert_eq!(c.integrations[0].name.as_str(), "contoso");
    assert!(c.integrations[0]
        .mapping
        .rules
        .iter()
        .any(|r| r.key == "custom.company"));
}

/// GOOD with its client_secret line replaced by `credential_lines`.
fn with_credential(credential_lines: &str) -> String {
    GOOD.replace(
        "client_secret = { value = \"s3cr3t-value\" }",
        credential_lines,
    )
}

fn write_cert_files(dir: &Path) {
    use rostersync_sim::keys;
    std::fs::write(dir.join("app.crt.pem"), keys::APP_CERT_PEM).unwrap();
    std::fs::write(dir.join("app.key.pem"), keys::APP_KEY_PEM).unwrap();
    std::fs::write(dir.join("other.key.pem"), keys::FORGER_KEY_PEM).unwrap();
}

#[test]
fn certificate_credentials_load_from_files_relative_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    write_cert_files(dir.path());
    let text = with_credential(
        "credential = \"certificate\"\ncertificate = \"app.crt.pem\"\ncertificate_key = { file = \"app.key.pem\" }",
    );
    let c = Config::from_toml(&text, dir.path()).unwrap();
    let ClientCredential::Certificate(cert) = &c.integrations[0].credential else {
        panic!("not a certificate credential");
    };
    assert_eq!(cert.alg(), CertificateAlg::Ps256);
    assert_eq!(
        cert.certificate().thumbprints().x5t_s256,
        rostersync_sim::keys::APP_CERT_X5T_S256
    );
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("PRIVATE KEY") && !dbg.contains("MII"),
        "{dbg}"
    );
    let rs = Config::from_toml(
        &text.replace(
            "credential = \"certificate\"",
            "credential = \"certificate\"\ncertificate_alg = \"RS256\"",
        ),
        dir.path(),
    )
    .unwrap();
    assert!(matches!(&rs.integrations[0].credential,
        ClientCredential::Certificate(c) if c.alg() == CertificateAlg::Rs256));
}

#[test]
fn credential_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write_cert_files(dir.path());
    let err_in = |text: &str| Config::from_toml(text, dir.path()).unwrap_err().to_string();
    let p = "integration[0] (contoso).";
    let cert = "credential = \"certificate\"\ncertificate = \"app.crt.pem\"\ncertificate_key = { file = \"app.key.pem\" }";
    let cases: Vec<(String, &str, &str)> = vec![
        (with_credential(""), "client_secret", "required"),
        (
            with_credential("credential = \"password\""),
            "credential",
            "workload_identity",
        ),
        (
            with_credential("credential = \"certificate\"\ncertificate_key = { file = \"app.key.pem\" }"),
            "certificate",
            "required",
        ),
        (
            with_credential("credential = \"certificate\"\ncertificate = \"app.crt.pem\""),
            "certificate_key",
            "required",
        ),
        (
            with_credential(&cert.replace("app.crt.pem", "missing.pem")),
            "certificate",
            "missing.pem",
        ),
        (
            with_credential(&cert.replace("app.crt.pem", "app.key.pem")),
            "certificate",
            "certificate_key",
        ),
        (
            with_credential(&cert.replace("{ file = \"app.key.pem\" }", "{ file = \"app.crt.pem\" }")),
            "certificate_key",
            "only a certificate",
        ),
        (
            with_credential(&cert.replace("app.key.pem", "other.key.pem")),
            "certificate_key",
            "does not belong to the certificate",
        ),
        (
            with_credential(&format!("{cert}\ncertificate_alg = \"ES256\"")),
            "certificate_alg",
            "PS256",
        ),
        (
            GOOD.replace(
                "client_secret = { value = \"s3cr3t-value\" }",
                &format!("client_secret = {{ value = \"s3cr3t-value\" }}\n{cert}"),
            ),
            "client_secret",
            "not used with credential = \"certificate\"",
        ),
        (
            with_credential("certificate = \"app.crt.pem\""),
            "certificate",
            "not used with credential = \"secret\"",
        ),
        (
            with_credential("credential = \"workload_identity\"\ncertificate_alg = \"PS256\"\nfederated_token_file = \"t\""),
            "certificate_alg",
            "not used",
        ),
    ];
    for (text, key, words) in cases {
        let e = err_in(&text);
        assert!(e.starts_with(&format!("{p}{key}:")), "{key}: {e}");
        assert!(e.contains(words), "{key}: {e}");
        assert!(!e.contains("MII"), "{e}");
    }
}

#[test]
fn workload_identity_takes_the_file_from_the_key_or_the_environment() {
    let raw = |extra: &str| -> RawConfig {
        toml::from_str(&with_credential(&format!(
            "credential = \"workload_identity\"\n{extra}"
        )))
        .unwrap()
    };
    let k = |f: &str| format!("integration[0] (contoso).{f}");
    let base = Path::new("/etc/rs");
    let env = Some(std::ffi::OsString::from(
        "/var/run/secrets/azure/tokens/azure-identity-token",
    ));
    let path_of = |r: RawConfig, env: Option<std::ffi::OsString>| match resolve_credential(
        &r.integration[0].credential_keys(),
        &k,
        base,
        env,
    ) {
        Ok(ClientCredential::WorkloadIdentity { token_file }) => Ok(token_file),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(
        path_of(raw(""), env.clone()).unwrap(),
        PathBuf::from("/var/run/secrets/azure/tokens/azure-identity-token")
    );
    assert_eq!(
        path_of(raw("federated_token_file = \"tokens/t.jwt\""), env).unwrap(),
        PathBuf::from("/etc/rs/tokens/t.jwt")
    );
    let e = path_of(raw(""), None).unwrap_err();
    assert!(
        e.starts_with("integration[0] (contoso).federated_token_file:")
            && e.contains(FEDERATED_TOKEN_FILE_ENV),
        "{e}"
    );
}

const ALERTS: &str = r#"
[alerts]
email_to = ["ops@example.com"]
email_from = "rostersync <rostersync@example.com>"
webhook_url = { value = "https://hooks.example.com/services/T0/B0/tok3n" }
digest_minutes = 30

[alerts.smtp]
host = "smtp.example.com"
username = { value = "mailer" }
password = { value = "smtp-pw" }
"#;

#[test]
fn alerts_are_global_and_overridable_per_integration() {
    let c = Config::from_toml(&format!("{GOOD}{ALERTS}"), Path::new(".")).unwrap();
    let a = &c.integrations[0].alerts;
    assert!(a.enabled());
    let e = a.email.as_ref().unwrap();
    assert_eq!(e.to, ["ops@example.com"]);
    assert_eq!((e.smtp.port, e.smtp.tls), (587, SmtpTls::StartTls));
    assert_eq!(e.smtp.password.as_ref().unwrap().expose_secret(), "smtp-pw");
    assert_eq!(
        (a.digest_minutes, a.repeat_minutes, a.repeat_hours),
        (30, 60, 24)
    );
    assert_eq!(c.integrations[0].client_secret_expires, None);
    // Without [alerts], alerts are off.
    let c = Config::from_toml(GOOD, Path::new(".")).unwrap();
    assert!(!c.integrations[0].alerts.enabled() && !c.alerts.enabled());

    // Per integration: its own recipients and windows, the rest inherited.
    let own = format!(
        "{}{ALERTS}",
        GOOD.replace(
            "\n[integration.target]",
            "client_secret_expires = 2027-03-31\n\n[integration.alerts]\nemail_to = [\"contoso-it@example.com\"]\nrepeat_minutes = 120\n\n[integration.target]"
        )
    );
    let c = Config::from_toml(&own, Path::new(".")).unwrap();
    let i = &c.integrations[0];
    let a = &i.alerts;
    assert_eq!(a.email.as_ref().unwrap().to, ["contoso-it@example.com"]);
    assert_eq!(a.email.as_ref().unwrap().smtp.host, "smtp.example.com");
    assert_eq!((a.digest_minutes, a.repeat_minutes), (30, 120));
    assert!(a.webhook_url.is_some());
    assert_eq!(c.alerts.email.as_ref().unwrap().to, ["ops@example.com"]);
    assert_eq!(
        i.client_secret_expires,
        chrono::NaiveDate::from_ymd_opt(2027, 3, 31)
    );
    // Or none at all for this integration.
    let off = GOOD.replace(
        "\n[integration.target]",
        "client_secret_expires = \"2027-03-31\"\n[integration.alerts]\nenabled = false\n\n[integration.target]",
    );
    let c = Config::from_toml(&format!("{off}{ALERTS}"), Path::new(".")).unwrap();
    assert!(!c.integrations[0].alerts.enabled() && c.alerts.enabled());
    assert!(c.integrations[0].client_secret_expires.is_some());
}

#[test]
fn alert_settings_are_validated_without_echoing_secrets() {
    let with = |from: &str, to: &str| err_of(&format!("{GOOD}{}", ALERTS.replace(from, to)));
    let e = with(
        "host = \"smtp.example.com\"",
        "host = \"smtp.example.com\"\ntls = \"none\"",
    );
    assert!(
        e.starts_with("alerts.smtp.tls:") && e.contains("localhost"),
        "{e}"
    );
    let e = with(
        "https://hooks.example.com/services/T0/B0/tok3n",
        "http://hooks.example.com/services/T0/B0/tok3n",
    );
    assert!(
        e.starts_with("alerts.webhook_url:") && !e.contains("tok3n"),
        "{e}"
    );
    let e = with("email_from = \"rostersync <rostersync@example.com>\"\n", "");
    assert!(e.starts_with("alerts.email_from:"), "{e}");
    let e = with("[\"ops@example.com\"]", "[\"ops at example\"]");
    assert!(e.starts_with("alerts.email_to:"), "{e}");
    let e = with("password = { value = \"smtp-pw\" }\n", "");
    assert!(e.starts_with("alerts.smtp.password:"), "{e}");
    let e = with("digest_minutes = 30", "digest_minutes = 0");
    assert!(e.starts_with("alerts.digest_minutes:"), "{e}");
    let e = with("digest_minutes = 30", "digest_minute = 30");
    assert!(e.contains("digest_minute"), "{e}");
    let e = err_of(&GOOD.replace(
        "\n[integration.target]",
        "client_secret_expires = \"31/03/2027\"\n\n[integration.target]",
    ));
    assert!(
        e.starts_with("integration[0] (contoso).client_secret_expires:"),
        "{e}"
    );
    let e = err_of(&format!(
        "{}{ALERTS}",
        GOOD.replace(
            "\n[integration.target]",
            "[integration.alerts]\nemail_to = [\"x\"]\n\n[integration.target]"
        )
    ));
    assert!(
        e.starts_with("integration[0] (contoso).alerts.email_to:"),
        "{e}"
    );
}

#[test]
fn the_example_alert_settings_are_valid_uncommented() {
    std::env::set_var("CONTOSO_SECRET", "x");
    std::env::set_var("CONTOSO_SCIM_TOKEN", "y");
    std::env::set_var("ROSTERSYNC_ALERT_WEBHOOK", "https://hooks.example.com/x");
    std::env::set_var("ROSTERSYNC_SMTP_USER", "mailer");
    std::env::set_var("ROSTERSYNC_SMTP_PASSWORD", "pw");
    let text = include_str!("../../config/example.toml");
    // Uncomment the settings of the alert blocks (they run to the next blank line) and
    // client_secret_expires.
    let mut in_block = false;
    let mut lines = Vec::new();
    for l in text.lines() {
        if l == "# [alerts]" || l == "# [integration.alerts]" {
            in_block = true;
        } else if l.is_empty() {
            in_block = false;
        }
        let rest = l.strip_prefix("# ").unwrap_or(l);
        let setting = rest.starts_with('[')
            || rest
                .split_once(" = ")
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        let wanted = (in_block || rest.starts_with("client_secret_expires")) && setting;
        lines.push(if wanted { rest } else { l });
    }
    let uncommented = lines.join("\n");
    let c = Config::from_toml(&uncommented, Path::new("config")).unwrap();
    let i = &c.integrations[0];
    assert!(i.client_secret_expires.is_some());
    assert!(c.alerts.email.is_some() && c.alerts.webhook_url.is_some());
    assert_eq!(
        i.alerts.email.as_ref().unwrap().to,
        ["contoso-it@example.com"]
    );
    assert_eq!(i.alerts.repeat_minutes, 120);
}

#[test]
fn deactivation_limits_parse() {
    use toml::Value;
    assert_eq!(
        DeactivationLimit::parse(&Value::String("10%".into())),
        Ok(DeactivationLimit::Percent(10.0))
    );
    assert_eq!(
        DeactivationLimit::parse(&Value::Integer(3)),
        Ok(DeactivationLimit::Count(3))
    );
    assert!(DeactivationLimit::parse(&Value::String("150%".into())).is_err());
    assert_eq!(DeactivationLimit::Percent(10.0).allowed(305), 30);
    assert_eq!(DeactivationLimit::Percent(10.0).allowed(5), 1);
    assert_eq!(DeactivationLimit::Percent(0.0).allowed(500), 0);
}
