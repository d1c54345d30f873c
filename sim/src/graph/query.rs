//! OData query options as Graph reads them: `$select`, `$top`, `$filter`, `$expand`, casts,
//! `@odata.context`.

use super::*;

pub(super) struct Query {
    /// `$select` items as written by the client.
    pub(super) select: Option<Vec<String>>,
    pub(super) top: Option<String>,
    pub(super) skiptoken: Option<String>,
    /// Raw `k=v` parts other than `$skiptoken`, kept for nextLinks.
    pub(super) passthrough: Vec<String>,
}

impl Query {
    pub(super) fn parse(raw: &str) -> Result<Query, (&'static str, String)> {
        let mut q = Query {
            select: None,
            top: None,
            skiptoken: None,
            passthrough: Vec::new(),
        };
        let mut seen: HashSet<String> = HashSet::new();
        for part in raw.split('&').filter(|p| !p.is_empty()) {
            let Some((k, v)) = url::form_urlencoded::parse(part.as_bytes()).next() else {
                continue;
            };
            let (k, v) = (k.into_owned(), v.into_owned());
            if k.starts_with('$') && !seen.insert(k.clone()) {
                return Err((
                    "Request_BadRequest",
                    format!(
                        "Query option '{k}' was specified more than once, it must be specified at most once."
                    ),
                ));
            }
            match k.as_str() {
                "$select" => {
                    let items: Vec<String> = v
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect();
                    if !items.is_empty() {
                        q.select = Some(items);
                    }
                }
                "$top" => q.top = Some(v),
                "$skiptoken" => {
                    q.skiptoken = Some(v);
                    continue;
                }
                other if UNIMPLEMENTED_OPTIONS.contains(&other) => {
                    return Err((
                        "Request_UnsupportedQuery",
                        format!(
                            "The query option '{other}' is not supported by the Graph simulator."
                        ),
                    ));
                }
                other if other.starts_with('$') => {
                    return Err((
                        "Request_BadRequest",
                        format!("The query parameter '{other}' is not supported."),
                    ));
                }
                _ => {}
            }
            q.passthrough.push(part.to_string());
        }
        Ok(q)
    }

    pub(super) fn page_size(&self) -> Result<usize, String> {
        let Some(t) = &self.top else {
            return Ok(DEFAULT_PAGE_SIZE);
        };
        match t.trim().parse::<i64>() {
            Ok(n) if (1..=MAX_PAGE_SIZE as i64).contains(&n) => Ok(n as usize),
            _ => Err(format!(
                "Invalid page size specified: '{t}'. Must be between 1 and {MAX_PAGE_SIZE} inclusive."
            )),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum TypeKind {
    User,
    Group,
    DirectoryObject,
}

impl TypeKind {
    pub(super) fn odata_name(self) -> &'static str {
        match self {
            TypeKind::User => "microsoft.graph.user",
            TypeKind::Group => "microsoft.graph.group",
            TypeKind::DirectoryObject => "microsoft.graph.directoryObject",
        }
    }
}

/// Validates `$select` against the properties of `kind`; returns canonical names.
pub(super) fn resolve_select(
    q: &Query,
    kind: TypeKind,
) -> Result<Option<Vec<&'static str>>, String> {
    let Some(items) = &q.select else {
        return Ok(None);
    };
    let mut out: Vec<&'static str> = Vec::new();
    for item in items {
        let find =
            |list: &[&'static str]| list.iter().copied().find(|p| p.eq_ignore_ascii_case(item));
        let found = match kind {
            TypeKind::User => find(USER_PROPS),
            TypeKind::Group => find(GROUP_PROPS),
            TypeKind::DirectoryObject => find(USER_PROPS).or_else(|| find(GROUP_PROPS)),
        };
        match found {
            Some(p) => {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            None => {
                return Err(format!(
                    "Parsing OData Select and Expand failed: Could not find a property named '{item}' on type '{}'.",
                    kind.odata_name()
                ))
            }
        }
    }
    Ok(Some(out))
}

/// `@odata.context` value: `{base}/v1.0/$metadata#{set}` or `#{set}(a,b)` with `$select`, plus
/// `/$entity` for single entities.
pub(super) fn context(base: &str, set: &str, q: &Query, entity: bool) -> String {
    let mut c = format!("{base}/v1.0/$metadata#{set}");
    if let Some(items) = &q.select {
        c.push('(');
        c.push_str(&items.join(","));
        c.push(')');
    }
    if entity {
        c.push_str("/$entity");
    }
    c
}
