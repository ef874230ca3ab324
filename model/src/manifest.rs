//! Reading manifests as users write them: YAML or JSON, one or many documents
//! (`---`), or a `v1 List`. Each document becomes an [`Object`] as it is; no
//! rewriting into a weft-specific shape.

use crate::objects::{DecodeError, Object};

/// Why a manifest could not be read; `document` counts from 1.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("document {document}: {source}")]
    Document {
        document: usize,
        #[source]
        source: DecodeError,
    },
    #[error("document {document}: items[{index}]: {source}")]
    ListItem {
        document: usize,
        index: usize,
        #[source]
        source: DecodeError,
    },
    #[error("document {document}: expected a mapping with apiVersion and kind")]
    NotAnObject { document: usize },
}

/// Parse every object in a manifest (YAML or JSON, multi-document, `List`s flattened).
pub fn parse_manifests(text: &str) -> Result<Vec<Object>, ManifestError> {
    let docs = parse_documents(text)?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let document = i + 1;
        if doc.is_null() {
            continue;
        }
        if !doc.is_object() {
            return Err(ManifestError::NotAnObject { document });
        }
        let is_list = doc.get("kind").and_then(|k| k.as_str()) == Some("List")
            || doc
                .get("kind")
                .and_then(|k| k.as_str())
                .is_some_and(|k| k.ends_with("List") && doc.get("items").is_some());
        if is_list {
            let items = match doc.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            for (index, item) in items.into_iter().enumerate() {
                out.push(
                    Object::from_value(item).map_err(|source| ManifestError::ListItem {
                        document,
                        index,
                        source,
                    })?,
                );
            }
        } else {
            out.push(
                Object::from_value(doc)
                    .map_err(|source| ManifestError::Document { document, source })?,
            );
        }
    }
    Ok(out)
}

/// Split a manifest into JSON values, one per document.
pub fn parse_documents(text: &str) -> Result<Vec<serde_json::Value>, ManifestError> {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON: one value, or a stream of concatenated values.
        let mut out = Vec::new();
        for v in serde_json::Deserializer::from_str(trimmed).into_iter::<serde_json::Value>() {
            match v.map_err(|e| ManifestError::Syntax(e.to_string()))? {
                serde_json::Value::Array(items) => out.extend(items),
                other => out.push(other),
            }
        }
        return Ok(out);
    }
    serde_saphyr::from_multiple::<serde_json::Value>(text)
        .map_err(|e| ManifestError::Syntax(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;

    #[test]
    fn multi_document_yaml_keeps_fields() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
# a comment between documents
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: http
    protocol: TCP
  sessionAffinity: ClientIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: ["198.18.128.5"]
  conditions: {ready: true}
  nodeName: node-1
"#;
        let objs = parse_manifests(text).unwrap();
        assert_eq!(objs.len(), 3);
        assert_eq!(objs[0].kind(), Kind::Namespace);
        let Object::Service(svc) = &objs[1] else {
            panic!("not a service")
        };
        let spec = svc.spec.as_ref().unwrap();
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(port.port, 80);
        assert_eq!(
            port.target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()))
        );
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        let Object::EndpointSlice(es) = &objs[2] else {
            panic!("not a slice")
        };
        assert_eq!(es.endpoints[0].addresses, vec!["198.18.128.5".to_string()]);
        assert_eq!(objs[2].namespace(), "shop");
    }

    #[test]
    fn json_object_and_list() {
        let one = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"}}"#;
        assert_eq!(parse_manifests(one).unwrap()[0].name(), "n1");
        let list = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}},
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"b"}}]}"#;
        let objs = parse_manifests(list).unwrap();
        assert_eq!(
            objs.iter().map(|o| o.name()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn errors_name_document_and_field() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: eighty\n";
        let err = parse_manifests(text).unwrap_err().to_string();
        assert!(err.contains("document 2"), "{err}");
        assert!(err.contains("spec.ports[0].port"), "{err}");

        let err = parse_manifests("apiVersion: apps/v1\nkind: Deployment\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Deployment"), "{err}");

        let err = parse_manifests("a: [unclosed").unwrap_err().to_string();
        assert!(err.contains("not valid YAML"), "{err}");
        assert!(parse_manifests("- just\n- a list\n").is_err());
    }

    #[test]
    fn empty_documents_are_skipped() {
        let objs = parse_manifests(
            "---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n",
        )
        .unwrap();
        assert_eq!(objs.len(), 1);
    }
}
