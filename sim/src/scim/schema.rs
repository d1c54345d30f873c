//! The schemas the simulator declares (RFC 7643 §4, §7, §8.7; docs/scim.md) and the discovery
//! documents built from them (RFC 7643 §5, §6, §7; RFC 7644 §4).

use serde_json::{json, Map, Value};

pub(crate) const CORE_USER_URN: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub(crate) const ENTERPRISE_URN: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
pub(crate) const LIST_RESPONSE_URN: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub(crate) const PATCH_OP_URN: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
pub(crate) const SEARCH_REQUEST_URN: &str = "urn:ietf:params:scim:api:messages:2.0:SearchRequest";
const SCHEMA_URN: &str = "urn:ietf:params:scim:schemas:core:2.0:Schema";
const RESOURCE_TYPE_URN: &str = "urn:ietf:params:scim:schemas:core:2.0:ResourceType";
const SPC_URN: &str = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";

/// Attribute data types (RFC 7643 §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // every value of RFC 7643 §2.2/§2.3, used or not
pub(crate) enum AttrType {
    String,
    Boolean,
    Decimal,
    Integer,
    DateTime,
    Binary,
    Reference,
    Complex,
}

impl AttrType {
    fn as_str(self) -> &'static str {
        match self {
            AttrType::String => "string",
            AttrType::Boolean => "boolean",
            AttrType::Decimal => "decimal",
            AttrType::Integer => "integer",
            AttrType::DateTime => "dateTime",
            AttrType::Binary => "binary",
            AttrType::Reference => "reference",
            AttrType::Complex => "complex",
        }
    }
}

/// `mutability` (RFC 7643 §2.2, §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mutability {
    ReadOnly,
    ReadWrite,
    Immutable,
    WriteOnly,
}

/// `returned` (RFC 7643 §2.2, §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // every value of RFC 7643 §2.2/§2.3, used or not
pub(crate) enum Returned {
    Always,
    Never,
    Default,
    Request,
}

/// `uniqueness` (RFC 7643 §2.2, §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // every value of RFC 7643 §2.2/§2.3, used or not
pub(crate) enum Uniqueness {
    None,
    Server,
    Global,
}

/// One attribute definition with its characteristics (RFC 7643 §7).
#[derive(Clone, Debug)]
pub(crate) struct AttrDef {
    pub name: String,
    pub ty: AttrType,
    pub multi: bool,
    pub required: bool,
    pub case_exact: bool,
    pub mutability: Mutability,
    pub returned: Returned,
    pub uniqueness: Uniqueness,
    pub description: String,
    pub canonical: Vec<String>,
    pub reference_types: Vec<String>,
    pub sub: Vec<AttrDef>,
}

impl AttrDef {
    /// A string attribute with the RFC 7643 §2.2 defaults.
    fn s(name: &str, description: &str) -> AttrDef {
        AttrDef {
            name: name.to_string(),
            ty: AttrType::String,
            multi: false,
            required: false,
            case_exact: false,
            mutability: Mutability::ReadWrite,
            returned: Returned::Default,
            uniqueness: Uniqueness::None,
            description: description.to_string(),
            canonical: Vec::new(),
            reference_types: Vec::new(),
            sub: Vec::new(),
        }
    }
    fn ty(mut self, ty: AttrType) -> Self {
        self.ty = ty;
        self
    }
    fn multi(mut self) -> Self {
        self.multi = true;
        self
    }
    fn required(mut self) -> Self {
        self.required = true;
        self
    }
    fn exact(mut self) -> Self {
        self.case_exact = true;
        self
    }
    fn mutability(mut self, m: Mutability) -> Self {
        self.mutability = m;
        self
    }
    fn returned(mut self, r: Returned) -> Self {
        self.returned = r;
        self
    }
    fn unique(mut self, u: Uniqueness) -> Self {
        self.uniqueness = u;
        self
    }
    fn canonical(mut self, values: &[&str]) -> Self {
        self.canonical = values.iter().map(|s| s.to_string()).collect();
        self
    }
    fn refs(mut self, types: &[&str]) -> Self {
        self.ty = AttrType::Reference;
        self.reference_types = types.iter().map(|s| s.to_string()).collect();
        self
    }
    fn complex(mut self, sub: Vec<AttrDef>) -> Self {
        self.ty = AttrType::Complex;
        self.sub = sub;
        self
    }

    /// Sub-attribute by name, case-insensitively (RFC 7643 §2.1).
    pub fn sub_attr(&self, name: &str) -> Option<&AttrDef> {
        self.sub.iter().find(|a| a.name.eq_ignore_ascii_case(name))
    }

    pub fn is_complex(&self) -> bool {
        self.ty == AttrType::Complex
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), self.name.clone().into());
        m.insert("type".into(), self.ty.as_str().into());
        m.insert("multiValued".into(), self.multi.into());
        m.insert("description".into(), self.description.clone().into());
        m.insert("required".into(), self.required.into());
        if !self.is_complex() {
            m.insert("caseExact".into(), self.case_exact.into());
        }
        if !self.canonical.is_empty() {
            m.insert("canonicalValues".into(), json!(self.canonical));
        }
        if self.ty == AttrType::Reference {
            m.insert("referenceTypes".into(), json!(self.reference_types));
        }
        let mutability = match self.mutability {
            Mutability::ReadOnly => "readOnly",
            Mutability::ReadWrite => "readWrite",
            Mutability::Immutable => "immutable",
            Mutability::WriteOnly => "writeOnly",
        };
        m.insert("mutability".into(), mutability.into());
        let returned = match self.returned {
            Returned::Always => "always",
            Returned::Never => "never",
            Returned::Default => "default",
            Returned::Request => "request",
        };
        m.insert("returned".into(), returned.into());
        let uniqueness = match self.uniqueness {
            Uniqueness::None => "none",
            Uniqueness::Server => "server",
            Uniqueness::Global => "global",
        };
        m.insert("uniqueness".into(), uniqueness.into());
        if self.is_complex() {
            let subs: Vec<Value> = self.sub.iter().map(AttrDef::to_json).collect();
            m.insert("subAttributes".into(), Value::Array(subs));
        }
        Value::Object(m)
    }
}

/// A schema (RFC 7643 §7).
#[derive(Clone, Debug)]
pub(crate) struct SchemaDef {
    pub id: String,
    pub name: String,
    pub description: String,
    pub attrs: Vec<AttrDef>,
}

impl SchemaDef {
    /// Attribute by name, case-insensitively (RFC 7643 §2.1).
    pub fn attr(&self, name: &str) -> Option<&AttrDef> {
        self.attrs
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name))
    }

    fn to_json(&self, base_url: &str) -> Value {
        json!({
            "schemas": [SCHEMA_URN],
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "attributes": self.attrs.iter().map(AttrDef::to_json).collect::<Vec<_>>(),
            "meta": {
                "resourceType": "Schema",
                "location": format!("{base_url}/Schemas/{}", self.id),
            },
        })
    }
}

/// Which schema a path lives in: the core User schema or extension number `i`.
pub(crate) type SchemaIdx = Option<usize>;

/// Every schema the server declares for Users.
#[derive(Clone, Debug)]
pub(crate) struct Registry {
    pub core: SchemaDef,
    /// The enterprise extension first, then the custom one when configured.
    pub extensions: Vec<SchemaDef>,
}

fn multi_complex(name: &str, description: &str, types: &[&str], value: AttrDef) -> AttrDef {
    AttrDef::s(name, description).multi().complex(vec![
        value,
        AttrDef::s(
            "display",
            "A human-readable name, primarily used for display purposes.",
        ),
        AttrDef::s("type", "A label indicating the attribute's function.").canonical(types),
        AttrDef::s(
            "primary",
            "Indicates the 'primary' or preferred attribute value.",
        )
        .ty(AttrType::Boolean),
    ])
}

fn core_user_schema() -> SchemaDef {
    use Mutability::*;
    let attrs = vec![
        // Common attributes (RFC 7643 §3.1). They belong to no schema, but §3.1 lets a schema
        // list them "for backward compatibility"; listing them tells clients that
        // `externalId` is accepted and that `id` is compared case-exactly.
        AttrDef::s(
            "id",
            "Unique identifier for the SCIM resource, issued by the service provider.",
        )
        .exact()
        .mutability(ReadOnly)
        .returned(Returned::Always)
        .unique(Uniqueness::Server),
        AttrDef::s(
            "externalId",
            "Identifier of the resource as defined by the provisioning client.",
        )
        .exact(),
        AttrDef::s("meta", "Resource metadata.")
            .mutability(ReadOnly)
            .complex(vec![
                AttrDef::s("resourceType", "Name of the resource type.")
                    .exact()
                    .mutability(ReadOnly),
                AttrDef::s(
                    "created",
                    "When the resource was added to the service provider.",
                )
                .ty(AttrType::DateTime)
                .mutability(ReadOnly),
                AttrDef::s("lastModified", "When the resource was last modified.")
                    .ty(AttrType::DateTime)
                    .mutability(ReadOnly),
                AttrDef::s("location", "URI of the resource being returned.")
                    .refs(&["uri"])
                    .exact()
                    .mutability(ReadOnly),
                AttrDef::s("version", "Version (ETag) of the resource.")
                    .exact()
                    .mutability(ReadOnly),
            ]),
        // RFC 7643 §8.7.1.
        AttrDef::s(
            "userName",
            "Unique identifier for the User, typically used by the user to directly authenticate \
             to the service provider. Each User MUST include a non-empty userName value.",
        )
        .required()
        .unique(Uniqueness::Server),
        AttrDef::s("name", "The components of the user's real name.").complex(vec![
            AttrDef::s("formatted", "The full name, formatted for display."),
            AttrDef::s("familyName", "The family name of the User."),
            AttrDef::s("givenName", "The given name of the User."),
            AttrDef::s("middleName", "The middle name(s) of the User."),
            AttrDef::s("honorificPrefix", "The honorific prefix(es) of the User."),
            AttrDef::s("honorificSuffix", "The honorific suffix(es) of the User."),
        ]),
        AttrDef::s(
            "displayName",
            "The name of the User, suitable for display to end-users.",
        ),
        AttrDef::s(
            "nickName",
            "The casual way to address the user in real life.",
        ),
        AttrDef::s(
            "profileUrl",
            "A fully qualified URL pointing to the User's online profile.",
        )
        .refs(&["external"]),
        AttrDef::s("title", "The user's title, such as 'Vice President'."),
        AttrDef::s(
            "userType",
            "Identifies the relationship between the organization and the user.",
        ),
        AttrDef::s(
            "preferredLanguage",
            "The User's preferred written or spoken language.",
        ),
        AttrDef::s("locale", "The User's default location for localization."),
        AttrDef::s(
            "timezone",
            "The User's time zone in the 'Olson' time zone database format.",
        ),
        AttrDef::s(
            "active",
            "A Boolean value indicating the User's administrative status.",
        )
        .ty(AttrType::Boolean),
        AttrDef::s("password", "The User's cleartext password.")
            .mutability(WriteOnly)
            .returned(Returned::Never),
        multi_complex(
            "emails",
            "Email addresses for the user.",
            &["work", "home", "other"],
            AttrDef::s("value", "Email address for the user."),
        ),
        multi_complex(
            "phoneNumbers",
            "Phone numbers for the User.",
            &["work", "home", "mobile", "fax", "pager", "other"],
            AttrDef::s("value", "Phone number of the User."),
        ),
        multi_complex(
            "ims",
            "Instant messaging addresses for the User.",
            &["aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo"],
            AttrDef::s("value", "Instant messaging address for the User."),
        ),
        multi_complex(
            "photos",
            "URLs of photos of the User.",
            &["photo", "thumbnail"],
            AttrDef::s("value", "URL of a photo of the User.").refs(&["external"]),
        ),
        AttrDef::s("addresses", "A physical mailing address for this User.")
            .multi()
            .complex(vec![
                AttrDef::s(
                    "formatted",
                    "The full mailing address, formatted for display.",
                ),
                AttrDef::s("streetAddress", "The full street address component."),
                AttrDef::s("locality", "The city or locality component."),
                AttrDef::s("region", "The state or region component."),
                AttrDef::s("postalCode", "The zip code or postal code component."),
                AttrDef::s(
                    "country",
                    "The country name component (ISO 3166-1 alpha-2).",
                ),
                AttrDef::s("type", "A label indicating the attribute's function.")
                    .canonical(&["work", "home", "other"]),
                AttrDef::s("primary", "Indicates the 'primary' or preferred address.")
                    .ty(AttrType::Boolean),
            ]),
        AttrDef::s("groups", "A list of groups to which the user belongs.")
            .multi()
            .mutability(ReadOnly)
            .complex(vec![
                AttrDef::s("value", "The identifier of the User's group.").mutability(ReadOnly),
                AttrDef::s("$ref", "The URI of the corresponding 'Group' resource.")
                    .refs(&["User", "Group"])
                    .mutability(ReadOnly),
                AttrDef::s("display", "A human-readable name.").mutability(ReadOnly),
                AttrDef::s("type", "direct or indirect membership.")
                    .canonical(&["direct", "indirect"])
                    .mutability(ReadOnly),
            ]),
        multi_complex(
            "entitlements",
            "A list of entitlements for the User.",
            &[],
            AttrDef::s("value", "The value of an entitlement."),
        ),
        multi_complex(
            "roles",
            "A list of roles for the User.",
            &[],
            AttrDef::s("value", "The value of a role."),
        ),
        multi_complex(
            "x509Certificates",
            "A list of certificates issued to the User.",
            &[],
            AttrDef::s("value", "The value of an X.509 certificate.").ty(AttrType::Binary),
        ),
    ];
    SchemaDef {
        id: CORE_USER_URN.to_string(),
        name: "User".to_string(),
        description: "User Account".to_string(),
        attrs,
    }
}

fn enterprise_schema() -> SchemaDef {
    // RFC 7643 §4.3, §8.7.2.
    let attrs = vec![
        AttrDef::s(
            "employeeNumber",
            "Numeric or alphanumeric identifier assigned to a person.",
        ),
        AttrDef::s("costCenter", "Identifies the name of a cost center."),
        AttrDef::s("organization", "Identifies the name of an organization."),
        AttrDef::s("division", "Identifies the name of a division."),
        AttrDef::s("department", "Identifies the name of a department."),
        AttrDef::s("manager", "The User's manager.").complex(vec![
            AttrDef::s(
                "value",
                "The id of the SCIM resource representing the User's manager.",
            ),
            AttrDef::s(
                "$ref",
                "The URI of the SCIM resource representing the User's manager.",
            )
            .refs(&["User"]),
            AttrDef::s("displayName", "The displayName of the User's manager.")
                .mutability(Mutability::ReadOnly),
        ]),
    ];
    SchemaDef {
        id: ENTERPRISE_URN.to_string(),
        name: "EnterpriseUser".to_string(),
        description: "Enterprise User".to_string(),
        attrs,
    }
}

fn custom_schema(urn: &str, attrs: &[String]) -> SchemaDef {
    let name = urn
        .trim_end_matches(":User")
        .rsplit(':')
        .find(|s| !s.is_empty() && !s.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .unwrap_or("Custom")
        .to_string();
    SchemaDef {
        id: urn.to_string(),
        name: format!("{name}User"),
        description: "Custom User extension".to_string(),
        attrs: attrs
            .iter()
            .map(|a| AttrDef::s(a, "Custom extension attribute."))
            .collect(),
    }
}

impl Registry {
    pub fn new(custom: Option<&(String, Vec<String>)>) -> Registry {
        let mut extensions = vec![enterprise_schema()];
        if let Some((urn, attrs)) = custom {
            if !urn.eq_ignore_ascii_case(ENTERPRISE_URN) && !urn.eq_ignore_ascii_case(CORE_USER_URN)
            {
                extensions.push(custom_schema(urn, attrs));
            }
        }
        Registry {
            core: core_user_schema(),
            extensions,
        }
    }

    pub fn schema(&self, idx: SchemaIdx) -> &SchemaDef {
        match idx.and_then(|i| self.extensions.get(i)) {
            Some(s) => s,
            None => &self.core,
        }
    }

    /// Extension by URN, case-insensitively.
    pub fn extension(&self, urn: &str) -> Option<usize> {
        self.extensions
            .iter()
            .position(|s| s.id.eq_ignore_ascii_case(urn))
    }

    /// Splits a fully-qualified name (`urn:…:User` or `urn:…:User:attr.sub`) into the
    /// declared schema and the rest after the `:` (empty when the whole schema is named).
    /// `None` when no declared schema URN is a prefix.
    pub fn split_urn<'a>(&self, s: &'a str) -> Option<(SchemaIdx, &'a str)> {
        let mut best: Option<(SchemaIdx, &'a str, usize)> = None;
        let candidates = std::iter::once((None, &self.core.id)).chain(
            self.extensions
                .iter()
                .enumerate()
                .map(|(i, e)| (Some(i), &e.id)),
        );
        for (idx, id) in candidates {
            let n = id.len();
            let Some(head) = s.get(..n) else { continue };
            if !head.eq_ignore_ascii_case(id) {
                continue;
            }
            let rest = &s[n..];
            let rest = if rest.is_empty() {
                rest
            } else if let Some(r) = rest.strip_prefix(':') {
                r
            } else {
                continue;
            };
            if best.as_ref().is_none_or(|b| n > b.2) {
                best = Some((idx, rest, n));
            }
        }
        best.map(|(i, r, _)| (i, r))
    }

    /// The `schemas` value of a resource: core plus every extension present in `attrs`
    /// (RFC 7643 §3).
    pub fn schemas_for(&self, attrs: &Map<String, Value>) -> Vec<Value> {
        let mut out = vec![Value::String(self.core.id.clone())];
        for e in &self.extensions {
            if attrs.contains_key(&e.id) {
                out.push(Value::String(e.id.clone()));
            }
        }
        out
    }

    pub fn schema_docs(&self, base_url: &str) -> Vec<Value> {
        std::iter::once(&self.core)
            .chain(self.extensions.iter())
            .map(|s| s.to_json(base_url))
            .collect()
    }

    pub fn schema_doc(&self, base_url: &str, urn: &str) -> Option<Value> {
        std::iter::once(&self.core)
            .chain(self.extensions.iter())
            .find(|s| s.id.eq_ignore_ascii_case(urn))
            .map(|s| s.to_json(base_url))
    }

    /// `/ResourceTypes/User` (RFC 7643 §6).
    pub fn user_resource_type(&self, base_url: &str) -> Value {
        let ext: Vec<Value> = self
            .extensions
            .iter()
            .map(|e| json!({"schema": e.id, "required": false}))
            .collect();
        json!({
            "schemas": [RESOURCE_TYPE_URN],
            "id": "User",
            "name": "User",
            "endpoint": "/Users",
            "description": "User Account",
            "schema": CORE_USER_URN,
            "schemaExtensions": ext,
            "meta": {
                "resourceType": "ResourceType",
                "location": format!("{base_url}/ResourceTypes/User"),
            },
        })
    }
}

/// `/ServiceProviderConfig` (RFC 7643 §5; every listed sub-attribute is required there).
pub(crate) fn service_provider_config(base_url: &str, max_results: usize) -> Value {
    json!({
        "schemas": [SPC_URN],
        "documentationUri": "https://example.invalid/rostersync/scim-simulator",
        "patch": {"supported": true},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": true, "maxResults": max_results},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": false},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "Authentication scheme using a static bearer token",
            "primary": true,
        }],
        "meta": {
            "resourceType": "ServiceProviderConfig",
            "location": format!("{base_url}/ServiceProviderConfig"),
        },
    })
}

/// A `ListResponse` carrying every item (discovery answers ignore paging, RFC 7644 §4).
pub(crate) fn list_all(items: Vec<Value>) -> Value {
    let n = items.len();
    json!({
        "schemas": [LIST_RESPONSE_URN],
        "totalResults": n,
        "startIndex": 1,
        "itemsPerPage": n,
        "Resources": items,
    })
}
