//! `POST /$batch`: JSON batching of up to 20 requests, each served (and throttled, and
//! charged) like a request of its own.

use super::*;

struct InnerRequest {
    id: String,
    method: String,
    url: String,
    depends_on: Vec<String>,
    /// The inner request's JSON body, serialized again (POST only).
    body: Option<Vec<u8>>,
    content_type: Option<String>,
    prefer: Option<String>,
    priority: Option<String>,
}

fn parse_batch(body: &[u8]) -> Result<Vec<InnerRequest>, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| "Invalid batch payload format.".to_string())?;
    let reqs = v
        .get("requests")
        .and_then(Value::as_array)
        .ok_or_else(|| "Invalid batch payload format.".to_string())?;
    if reqs.len() > MAX_BATCH {
        return Err(format!(
            "The number of requests in the batch ({}) exceeds the limit of {MAX_BATCH}.",
            reqs.len()
        ));
    }
    let mut out = Vec::with_capacity(reqs.len());
    let mut ids: HashSet<String> = HashSet::new();
    for r in reqs {
        let id = r
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| "Each request in a batch must have a non-empty 'id'.".to_string())?;
        if !ids.insert(id.to_string()) {
            return Err(format!("Duplicate request id '{id}' in batch."));
        }
        let method = r
            .get("method")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("Request '{id}' in batch has no 'method'."))?;
        let url = r
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("Request '{id}' in batch has no 'url'."))?;
        let mut content_type = None;
        let mut prefer = None;
        let mut priority = None;
        if let Some(h) = r.get("headers") {
            match h {
                Value::Object(m) => {
                    let header = |name: &str| {
                        m.iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(name))
                            .and_then(|(_, v)| v.as_str())
                            .map(str::to_string)
                    };
                    content_type = header("content-type");
                    prefer = header("prefer");
                    priority = header("x-ms-throttle-priority");
                }
                Value::Null => {}
                _ => return Err(format!("Request '{id}' in batch has invalid 'headers'.")),
            }
        }
        let body = match r.get("body") {
            None | Some(Value::Null) => None,
            Some(b) => {
                if content_type.is_none() {
                    return Err(format!(
                        "Request '{id}' in batch has a body but no 'Content-Type' header."
                    ));
                }
                Some(serde_json::to_vec(b).unwrap_or_default())
            }
        };
        let depends_on = match r.get("dependsOn") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|d| d.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| format!("Request '{id}' in batch has an invalid 'dependsOn'."))?,
            Some(_) => {
                return Err(format!(
                    "Request '{id}' in batch has an invalid 'dependsOn'."
                ))
            }
        };
        out.push(InnerRequest {
            id: id.to_string(),
            method: method.to_string(),
            url: url.to_string(),
            depends_on,
            body,
            content_type,
            prefer,
            priority,
        });
    }
    for r in &out {
        for d in &r.depends_on {
            if !ids.contains(d) || d == &r.id {
                return Err(format!(
                    "Request '{}' depends on unknown request id '{d}'.",
                    r.id
                ));
            }
        }
    }
    Ok(out)
}

pub(super) fn batch(
    s: &mut State,
    base: &str,
    ctx: &Ctx,
    body: &[u8],
    priority: Option<&str>,
) -> ApiResponse {
    let reqs = match parse_batch(body) {
        Ok(r) => r,
        Err(msg) => return graph_error(ctx, 400, "BadRequest", &msg),
    };
    let mut done: HashMap<String, u16> = HashMap::new();
    let mut responses: Vec<(String, ApiResponse)> = Vec::with_capacity(reqs.len());
    // Resolve dependsOn: repeatedly serve the requests whose dependencies are answered.
    let mut pending: Vec<&InnerRequest> = reqs.iter().collect();
    while !pending.is_empty() {
        let (ready, waiting): (Vec<&InnerRequest>, Vec<&InnerRequest>) = pending
            .into_iter()
            .partition(|r| r.depends_on.iter().all(|d| done.contains_key(d)));
        if ready.is_empty() {
            return graph_error(
                ctx,
                400,
                "BadRequest",
                "The dependsOn references in the batch form a cycle.",
            );
        }
        for r in ready {
            let inner_ctx = Ctx {
                request_id: uuid::Uuid::new_v4().to_string(),
                client_request_id: ctx.client_request_id.clone(),
            };
            let failed_dep = r
                .depends_on
                .iter()
                .find(|d| !(200..300).contains(done.get(*d).unwrap_or(&0)));
            let resp = match failed_dep {
                Some(d) => graph_error(
                    &inner_ctx,
                    424,
                    "FailedDependency",
                    &format!("The request depends on request '{d}', which failed."),
                ),
                None => serve_inner(s, base, &inner_ctx, r, priority),
            };
            done.insert(r.id.clone(), resp.status);
            responses.push((r.id.clone(), resp));
        }
        pending = waiting;
    }
    // Graph does not preserve request order: shuffle deterministically, never the identity.
    let before: Vec<String> = responses.iter().map(|(id, _)| id.clone()).collect();
    responses.shuffle(&mut s.shuffle_rng);
    if responses.len() > 1 && responses.iter().map(|(id, _)| id).eq(before.iter()) {
        responses.rotate_left(1);
    }
    // {"responses":[{"id","status","headers":{..},"body":..}]}, each body as it was rendered.
    let mut out = Vec::with_capacity(256 * responses.len());
    out.extend_from_slice(b"{\"responses\":[");
    for (i, (id, resp)) in responses.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let headers: Map<String, Value> = resp
            .headers
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        let head = json!({ "id": id, "status": resp.status, "headers": headers });
        let head = serde_json::to_vec(&head).unwrap_or_default();
        // `head` is an object: reopen it to add the body.
        out.extend_from_slice(&head[..head.len().saturating_sub(1)]);
        out.extend_from_slice(b",\"body\":");
        out.extend_from_slice(&resp.body.into_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    ApiResponse {
        status: 200,
        headers: vec![("Content-Type".into(), ODATA_JSON.into())],
        body: Body::Rendered(out),
    }
}

fn serve_inner(
    s: &mut State,
    base: &str,
    ctx: &Ctx,
    r: &InnerRequest,
    batch_priority: Option<&str>,
) -> ApiResponse {
    let url = r.url.trim();
    if url.starts_with("http://") || url.starts_with("https://") {
        s.count("other");
        return bad_request(
            ctx,
            "Invalid request URL: batch request URLs must be relative.",
        );
    }
    let url = url.trim_start_matches('/');
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let path = path.trim_end_matches('/');
    let segs = decode_segments(path);
    if segs.len() == 1 && segs[0] == "$batch" {
        s.count("other");
        return bad_request(ctx, "Nested batch requests are not supported.");
    }
    s.count(classify(&segs));
    let payload = Payload {
        body: r.body.as_deref().unwrap_or(&[]),
        content_type: r.content_type.as_deref(),
        prefer: r.prefer.as_deref(),
        priority: Priority::parse(r.priority.as_deref().or(batch_priority)),
    };
    serve(s, base, ctx, &r.method, path, &segs, query, payload)
}
