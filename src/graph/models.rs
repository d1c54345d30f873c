//! Graph objects as rostersync reads them: only the `$select`ed properties are kept.

use serde_json::{Map, Value};

/// A user (or a manager) as read from Graph.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphUser {
    pub id: String,
    pub props: Map<String, Value>,
}

impl GraphUser {
    /// Takes a Graph JSON object; it must carry a string `id`.
    pub(crate) fn from_value(v: Value) -> Result<Self, String> {
        let Value::Object(mut props) = v else {
            return Err("a member is not a JSON object".into());
        };
        let id = match props.get("id") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
            _ => return Err("a member has no string `id`".into()),
        };
        props.retain(|k, _| !k.starts_with("@odata"));
        Ok(Self { id, props })
    }

    /// A property as a non-empty string: dotted paths reach nested objects, arrays give their
    /// first element, booleans and numbers are rendered.
    pub(crate) fn string(&self, path: &str) -> Option<String> {
        let mut parts = path.split('.');
        let mut cur = self.props.get(parts.next()?)?;
        for p in parts {
            cur = cur.get(p)?;
        }
        let s = match cur {
            Value::String(s) => s.trim().to_string(),
            Value::Array(a) => a
                .first()
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .trim()
                .to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        (!s.is_empty()).then_some(s)
    }
}

/// A group as read from Graph.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphGroup {
    pub id: String,
    pub display_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_are_read_leniently() {
        let u = GraphUser::from_value(json!({"id":"1","businessPhones":["+1 555"],"accountEnabled":false,
            "mail":"  ","onPremisesExtensionAttributes":{"extensionAttribute1":"x"},"@odata.type":"#microsoft.graph.user"})).unwrap();
        assert_eq!(u.string("businessPhones").as_deref(), Some("+1 555"));
        assert_eq!(u.string("accountEnabled").as_deref(), Some("false"));
        assert_eq!(u.string("mail"), None);
        assert_eq!(
            u.string("onPremisesExtensionAttributes.extensionAttribute1")
                .as_deref(),
            Some("x")
        );
        assert!(!u.props.contains_key("@odata.type"));
        assert!(GraphUser::from_value(json!({"displayName":"no id"})).is_err());
        assert!(GraphUser::from_value(json!([1])).is_err());
    }
}
