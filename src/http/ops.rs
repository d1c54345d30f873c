//! The admin API of operator commands, `/admin/{integration}/…`: what `rostersync queue`,
//! `subscriptions`, `explain` and `sync-user` send to the `serve` that holds the data
//! directory (see `ops::client`). Every route needs `server.admin_token` (Bearer) and answers
//! JSON: the command's document, or an [`ApiError`] with a stable code. Store reads run here on
//! the blocking pool; what needs serve's live clients and locks goes through [`Serving`].

use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::admin::{authorized, refused_admin_request, Admin};
use crate::ops::queue::{self, ReplayRequest, DEAD_PAGE_MAX};
use crate::ops::subscriptions::{SubsAnswer, SubsCommand};
use crate::ops::{ApiError, ErrorCode, Serving, SyncUserRequest, MAX_REQUEST_BYTES, MAX_USER_KEY};
use crate::store::IntegrationStore;

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/admin/{integration}")
            .app_data(web::PayloadConfig::new(MAX_REQUEST_BYTES))
            .route("/queue", web::get().to(stats))
            .route("/queue/dead", web::get().to(dead))
            .route("/queue/replay", web::post().to(replay))
            .route("/subscriptions", web::get().to(subs_list))
            .route("/subscriptions/renew", web::post().to(subs_renew))
            .route("/subscriptions/delete", web::post().to(subs_delete))
            .route("/explain", web::get().to(explain))
            .route("/sync-user", web::post().to(sync_user)),
    );
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Disabled | ErrorCode::UnknownIntegration | ErrorCode::UserNotFound => {
            StatusCode::NOT_FOUND
        }
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Busy | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Failed | ErrorCode::Other => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(e: ApiError) -> HttpResponse {
    HttpResponse::build(status_of(e.code))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(e)
}

fn ok<T: Serialize>(doc: &T) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(doc)
}

/// The token check, then the integration: its store, and serve's live side.
fn admit(
    req: &HttpRequest,
    admin: &Admin,
    integration: &str,
) -> Result<(IntegrationStore, Option<Arc<dyn Serving>>), ApiError> {
    let Some(token) = &admin.token else {
        return Err(ApiError::new(
            ErrorCode::Disabled,
            "serve runs without server.admin_token, so its admin API is off",
        ));
    };
    if !authorized(req, token) {
        refused_admin_request(req);
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "the admin token was missing or wrong",
        ));
    }
    let store = admin
        .integrations
        .iter()
        .find(|i| i.name == integration)
        .map(|i| i.store.clone())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownIntegration,
                format!(
                    "serve has no integration {:?}",
                    crate::text::clip(integration, 64)
                ),
            )
        })?;
    Ok((store, admin.serving.clone()))
}

fn live(s: Option<Arc<dyn Serving>>) -> Result<Arc<dyn Serving>, ApiError> {
    s.ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "serve is not running commands"))
}

/// Runs a store read off the HTTP workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    match web::block(f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(ApiError::new(ErrorCode::Failed, e.to_string())),
        Err(_) => Err(ApiError::new(ErrorCode::Failed, "the store read stopped")),
    }
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("the request body is not valid: {e}"),
        )
    })
}

fn respond<T: Serialize>(r: Result<T, ApiError>) -> HttpResponse {
    match r {
        Ok(doc) => ok(&doc),
        Err(e) => error(e),
    }
}

async fn stats(req: HttpRequest, path: web::Path<String>, admin: web::Data<Admin>) -> HttpResponse {
    respond(
        async {
            let (store, _) = admit(&req, &admin, &path)?;
            blocking(move || queue::stats(&store, chrono::Utc::now())).await
        }
        .await,
    )
}

#[derive(Deserialize)]
struct DeadQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn dead(req: HttpRequest, path: web::Path<String>, admin: web::Data<Admin>) -> HttpResponse {
    respond(
        async {
            let (store, _) = admit(&req, &admin, &path)?;
            let q = web::Query::<DeadQuery>::from_query(req.query_string())
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
            let limit = q.limit.unwrap_or(DEAD_PAGE_MAX).clamp(1, DEAD_PAGE_MAX);
            let after = q.after;
            blocking(move || queue::dead_page(&store, after, limit)).await
        }
        .await,
    )
}

async fn replay(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    admin: web::Data<Admin>,
) -> HttpResponse {
    respond(
        async {
            let (_, serving) = admit(&req, &admin, &path)?;
            let r: ReplayRequest = json_body(&body)?;
            r.check()
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, e))?;
            live(serving)?.replay(&path, r).await
        }
        .await,
    )
}

async fn subs(
    req: HttpRequest,
    integration: &str,
    admin: &Admin,
    cmd: SubsCommand,
) -> HttpResponse {
    let answer = async {
        let (_, serving) = admit(&req, admin, integration)?;
        live(serving)?.subscriptions(integration, cmd).await
    }
    .await;
    match answer {
        Ok(SubsAnswer::List(d)) => ok(&d),
        Ok(SubsAnswer::Renew(d)) => ok(&d),
        Ok(SubsAnswer::Delete(d)) => ok(&d),
        Err(e) => error(e),
    }
}

async fn subs_list(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    subs(req, &path, &admin, SubsCommand::List).await
}

async fn subs_renew(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    subs(req, &path, &admin, SubsCommand::Renew).await
}

async fn subs_delete(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    subs(req, &path, &admin, SubsCommand::Delete).await
}

#[derive(Deserialize)]
struct UserQuery {
    user: String,
}

fn user_key(user: &str) -> Result<(), ApiError> {
    if user.trim().is_empty() || user.len() > MAX_USER_KEY {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("the user must be 1 to {MAX_USER_KEY} bytes"),
        ));
    }
    Ok(())
}

/// The explanation, known or not (the CLI decides its exit code as it does on the store).
async fn explain(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    respond(
        async {
            let (store, _) = admit(&req, &admin, &path)?;
            let q = web::Query::<UserQuery>::from_query(req.query_string())
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
            let user = q.into_inner().user;
            user_key(&user)?;
            blocking(move || crate::sync::trace::explain(&store, &user)).await
        }
        .await,
    )
}

async fn sync_user(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    admin: web::Data<Admin>,
) -> HttpResponse {
    respond(
        async {
            let (_, serving) = admit(&req, &admin, &path)?;
            let r: SyncUserRequest = json_body(&body)?;
            user_key(&r.user)?;
            live(serving)?.sync_user(&path, r).await
        }
        .await,
    )
}
