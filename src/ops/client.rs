//! The admin API's client: how a command reaches the `serve` that holds the data directory.
//!
//! The address comes from the config the command was given: `server.listen` first (an
//! unspecified address such as `0.0.0.0` is asked on loopback, `https` with built-in TLS, the
//! certificate checked against `public_url`'s host name when it has one, with the configured
//! certificate chain trusted beside the system's roots), then `public_url` (https, or http on
//! loopback only). Every request carries `server.admin_token` as a bearer token; proxies from
//! the environment are not used, so the token goes nowhere else. Errors never hold the token.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Serialize;
use url::Url;

use super::queue::{DeadPage, ReplayDoc, ReplayRequest, StatsDoc};
use super::subscriptions::{DeleteDoc, ListDoc, RenewDoc};
use super::{error_chain as chain, paths, ApiError, ErrorCode, SyncUserRequest};
use crate::config::ServerConfig;
use crate::sync::trace::{Explanation, Trace};

const CONNECT: Duration = Duration::from_secs(5);
/// Store reads and queue changes.
const QUICK: Duration = Duration::from_secs(60);
/// Commands that call Graph or the LMS, and may first wait for the integration's run lock.
const SLOW: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server.admin_token is not set, so serve's admin API is off")]
    NoToken,
    #[error("server.listen has port 0 and there is no usable server.public_url: no address to reach serve at")]
    NoAddress,
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
    #[error("no rostersync serve answers at {tried}: {reason}")]
    Unreachable { tried: String, reason: String },
    #[error("{}", .0.error)]
    Api(ApiError),
    #[error("serve at {base} answered {status}, not rostersync's admin API: {text}")]
    NotAdminApi {
        base: String,
        status: u16,
        text: String,
    },
    #[error("serve's answer could not be read: {0}")]
    Decode(String),
}

impl ClientError {
    /// The admin API's error code, when serve answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

/// One way to reach serve: a base URL, and with built-in TLS the address its host name is
/// taken to mean (`listen`, while the certificate is checked for `public_url`'s name).
struct Route {
    base: Url,
    http: reqwest::Client,
}

pub struct AdminClient {
    routes: Vec<Route>,
    token: SecretString,
    /// The route that answered last; tried first.
    working: Mutex<usize>,
}

impl AdminClient {
    /// The client for the `serve` this server config describes.
    pub fn new(server: &ServerConfig) -> Result<AdminClient, ClientError> {
        let token = server.admin_token.clone().ok_or(ClientError::NoToken)?;
        let extra_roots = match &server.tls {
            Some(t) => {
                let pem = std::fs::read(&t.cert).map_err(|e| {
                    ClientError::Build(format!("server.tls_cert {}: {e}", t.cert.display()))
                })?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| ClientError::Build(format!("server.tls_cert: {e}")))?
            }
            None => Vec::new(),
        };
        let client = |resolve: Option<(&str, SocketAddr)>| {
            let mut b = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(CONNECT)
                .user_agent(concat!("rostersync-cli/", env!("CARGO_PKG_VERSION")))
                .tls_certs_merge(extra_roots.clone());
            if let Some((host, addr)) = resolve {
                b = b.resolve(host, addr);
            }
            b.build().map_err(|e| ClientError::Build(e.to_string()))
        };
        let mut routes = Vec::new();
        if let Some((base, resolve)) = listen_route(server) {
            let http = client(resolve.as_ref().map(|(h, a)| (h.as_str(), *a)))?;
            routes.push(Route { base, http });
        }
        if let Some(base) = public_route(server) {
            if !routes.iter().any(|r| r.base == base) {
                routes.push(Route {
                    base,
                    http: client(None)?,
                });
            }
        }
        if routes.is_empty() {
            return Err(ClientError::NoAddress);
        }
        Ok(AdminClient {
            routes,
            token,
            working: Mutex::new(0),
        })
    }

    /// Where requests go (the route that answered last).
    pub fn base(&self) -> String {
        let i = *self.working.lock().unwrap_or_else(|e| e.into_inner());
        self.routes[i].base.to_string()
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let first = *self.working.lock().unwrap_or_else(|e| e.into_inner());
        let order = std::iter::once(first).chain((0..self.routes.len()).filter(|i| *i != first));
        let mut failures = Vec::new();
        for i in order {
            let route = &self.routes[i];
            let url = format!("{}{path}", route.base.as_str().trim_end_matches('/'));
            let mut req = route
                .http
                .request(method.clone(), &url)
                .timeout(timeout)
                .bearer_auth(self.token.expose_secret());
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                // Nobody there: the next route. Anything else went out: no second try.
                Err(e) if e.is_connect() => {
                    failures.push(format!("{}: {}", route.base, chain(&e.without_url())));
                    continue;
                }
                Err(e) => {
                    return Err(ClientError::Unreachable {
                        tried: route.base.to_string(),
                        reason: chain(&e.without_url()),
                    })
                }
            };
            *self.working.lock().unwrap_or_else(|e| e.into_inner()) = i;
            let status = resp.status();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| ClientError::Decode(chain(&e.without_url())))?;
            if status.is_success() {
                return serde_json::from_slice(&bytes)
                    .map_err(|e| ClientError::Decode(e.to_string()));
            }
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => ClientError::Api(e),
                Err(_) => ClientError::NotAdminApi {
                    base: route.base.to_string(),
                    status: status.as_u16(),
                    text: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                },
            });
        }
        Err(ClientError::Unreachable {
            tried: self
                .routes
                .iter()
                .map(|r| r.base.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            reason: failures.join("; "),
        })
    }

    pub async fn queue_stats(&self, integration: &str) -> Result<StatsDoc, ClientError> {
        self.call(Method::GET, &paths::queue(integration), &[], None, QUICK)
            .await
    }

    pub async fn dead_page(
        &self,
        integration: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<DeadPage, ClientError> {
        let mut q = vec![("limit", limit.to_string())];
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        self.call(Method::GET, &paths::dead(integration), &q, None, QUICK)
            .await
    }

    pub async fn replay(
        &self,
        integration: &str,
        req: &ReplayRequest,
    ) -> Result<ReplayDoc, ClientError> {
        let body = json(req)?;
        self.call(Method::POST, &paths::replay(integration), &[], body, QUICK)
            .await
    }

    pub async fn subscriptions(&self, integration: &str) -> Result<ListDoc, ClientError> {
        self.call(
            Method::GET,
            &paths::subscriptions(integration),
            &[],
            None,
            SLOW,
        )
        .await
    }

    pub async fn renew(&self, integration: &str) -> Result<RenewDoc, ClientError> {
        self.call(Method::POST, &paths::renew(integration), &[], None, SLOW)
            .await
    }

    pub async fn delete(&self, integration: &str) -> Result<DeleteDoc, ClientError> {
        self.call(Method::POST, &paths::delete(integration), &[], None, SLOW)
            .await
    }

    pub async fn explain(&self, integration: &str, user: &str) -> Result<Explanation, ClientError> {
        let q = [("user", user.to_string())];
        self.call(Method::GET, &paths::explain(integration), &q, None, QUICK)
            .await
    }

    pub async fn sync_user(
        &self,
        integration: &str,
        req: &SyncUserRequest,
    ) -> Result<Trace, ClientError> {
        let body = json(req)?;
        self.call(
            Method::POST,
            &paths::sync_user(integration),
            &[],
            body,
            SLOW,
        )
        .await
    }
}

fn json<T: Serialize>(body: &T) -> Result<Option<Vec<u8>>, ClientError> {
    serde_json::to_vec(body)
        .map(Some)
        .map_err(|e| ClientError::Build(e.to_string()))
}

/// `server.listen` as a base URL: an unspecified address is asked on loopback; with built-in
/// TLS and a `public_url` host name, that name (so the certificate matches), resolved to the
/// listen address.
fn listen_route(server: &ServerConfig) -> Option<(Url, Option<(String, SocketAddr)>)> {
    let listen = server.listen;
    if listen.port() == 0 {
        return None;
    }
    let ip = match listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, listen.port());
    if server.tls.is_none() {
        return Url::parse(&format!("http://{addr}/"))
            .ok()
            .map(|u| (u, None));
    }
    let name = server.public_url.as_ref().and_then(|u| match u.host() {
        Some(url::Host::Domain(d)) => Some(d.to_string()),
        _ => None,
    });
    match name {
        Some(host) => Url::parse(&format!("https://{host}:{}/", listen.port()))
            .ok()
            .map(|u| (u, Some((host, addr)))),
        None => Url::parse(&format!("https://{addr}/"))
            .ok()
            .map(|u| (u, None)),
    }
}

/// `public_url`, where the token may go: https, or http to a loopback address.
fn public_route(server: &ServerConfig) -> Option<Url> {
    let u = server.public_url.as_ref()?;
    let loopback = u.host_str().is_some_and(crate::text::is_loopback_host);
    (u.scheme() == "https" || loopback).then(|| u.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn server(extra: &str) -> ServerConfig {
        let text = format!(
            "[server]\ndata_dir = \"/tmp/x\"\n{extra}\n\n[[integration]]\nname = \"a\"\ntenant_id = \"contoso.onmicrosoft.com\"\nclient_id = \"00000000-0000-0000-0000-000000000001\"\nclient_secret = {{ value = \"s3cret-value\" }}\ngroups = [\"00000000-0000-0000-0000-000000000002\"]\n\n[integration.target]\nkind = \"scim\"\nurl = \"https://lms.example.com/scim/v2\"\ntoken = {{ value = \"t0ken-value\" }}\n"
        );
        Config::from_toml(&text, std::path::Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"))
            .server
    }

    fn bases(s: &ServerConfig) -> Vec<String> {
        AdminClient::new(s)
            .unwrap()
            .routes
            .iter()
            .map(|r| r.base.to_string())
            .collect()
    }

    #[test]
    fn serve_is_found_on_loopback_first_then_at_its_public_url() {
        let s = server("listen = \"0.0.0.0:8080\"\nadmin_token = { value = \"admin-token-1234\" }\nallow_cleartext_admin = true\npublic_url = \"https://sync.example.com/base\"");
        assert_eq!(
            bases(&s),
            ["http://127.0.0.1:8080/", "https://sync.example.com/base"]
        );
        let s = server("listen = \"[::]:9000\"\nadmin_token = { value = \"admin-token-1234\" }\nallow_cleartext_admin = true");
        assert_eq!(bases(&s), ["http://[::1]:9000/"]);
        // Port 0 and no public_url: nowhere to ask (config refuses a plain-http public_url
        // that is not loopback, and `public_route` would not send the token there either).
        let s = server("listen = \"127.0.0.1:0\"\nadmin_token = { value = \"admin-token-1234\" }");
        assert!(matches!(AdminClient::new(&s), Err(ClientError::NoAddress)));
        let s = server("listen = \"127.0.0.1:8080\"");
        assert!(matches!(AdminClient::new(&s), Err(ClientError::NoToken)));
    }

    #[test]
    fn with_built_in_tls_the_certificate_is_checked_for_the_public_name() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
        let tls = format!(
            "tls_cert = \"{dir}/rsa-fullchain.pem\"\ntls_key = \"{dir}/rsa-key-pkcs8.pem\""
        );
        let s = server(&format!("listen = \"0.0.0.0:8443\"\nadmin_token = {{ value = \"admin-token-1234\" }}\npublic_url = \"https://sync.example.com\"\n{tls}"));
        let (base, resolve) = listen_route(&s).unwrap();
        assert_eq!(base.as_str(), "https://sync.example.com:8443/");
        assert_eq!(
            resolve,
            Some(("sync.example.com".into(), "127.0.0.1:8443".parse().unwrap()))
        );
        let s = server(&format!(
            "listen = \"127.0.0.1:8443\"\nadmin_token = {{ value = \"admin-token-1234\" }}\n{tls}"
        ));
        assert_eq!(bases(&s), ["https://127.0.0.1:8443/"]);
    }
}
