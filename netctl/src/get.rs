//! `netctl get KIND [NAME...]`: tables like kubectl, or JSON, YAML, names.

use crate::table::render_objects;
use crate::{list_path, object_path, object_ref, report, Context};
use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use std::io::Write;
use weft_model::{Kind, Object};

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Resource type: svc, po, no, ns, endpointslices (or their full names).
    pub kind: String,
    /// Object names (all objects when none are given).
    pub names: Vec<String>,
    /// Label selector, e.g. `app=web,tier!=db`.
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum)]
    pub output: Option<Output>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Wide,
    Json,
    Yaml,
    Name,
}

/// Parse a kind as the user typed it, with kubectl's error otherwise.
pub fn parse_kind(word: &str) -> Result<Kind> {
    Kind::from_resource(word)
        .with_context(|| format!("the server doesn't have a resource type \"{word}\""))
}

pub async fn run(
    ctx: &Context,
    args: &GetArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool> {
    let kind = parse_kind(&args.kind)?;
    let mut ok = true;
    // (raw JSON as the server sent it, decoded object)
    let mut found: Vec<(Value, Object)> = Vec::new();
    let by_name = !args.names.is_empty();

    if by_name {
        if args.selector.is_some() {
            bail!("selector (-l) and names cannot be combined");
        }
        if ctx.all_namespaces && kind.namespaced() {
            bail!("a resource cannot be retrieved by name across all namespaces");
        }
        for name in &args.names {
            let resp = ctx
                .client
                .get(&object_path(kind, ctx.namespace(), name))
                .await?;
            if !resp.is_success() {
                report(err, &resp.api_error().or_not_found(kind, name))?;
                ok = false;
                continue;
            }
            let raw = resp.json()?;
            let obj = decode(kind, &raw)?;
            found.push((raw, obj));
        }
    } else {
        let ns = (!ctx.all_namespaces).then(|| ctx.namespace());
        let resp = ctx
            .client
            .get(&list_path(kind, ns, args.selector.as_deref()))
            .await?;
        if !resp.is_success() {
            report(err, &resp.api_error())?;
            return Ok(false);
        }
        let list = resp.json()?;
        let items = match list.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => bail!("the server's {} list has no items array", kind.name()),
        };
        for raw in items {
            let obj = decode(kind, &raw)?;
            found.push((raw, obj));
        }
    }

    let now = crate::table::now();
    let single = by_name && args.names.len() == 1;
    print(ctx, kind, &found, args.output, single, now, out, err)?;
    Ok(ok)
}

fn decode(kind: Kind, raw: &Value) -> Result<Object> {
    Object::from_value_as(kind, raw.clone())
        .with_context(|| format!("the server sent a {} netctl cannot read", kind.name()))
}

/// Write the objects in the requested format. `single`: one object was asked
/// for by name, so JSON/YAML show it alone rather than in a List.
#[allow(clippy::too_many_arguments)]
pub fn print(
    ctx: &Context,
    kind: Kind,
    found: &[(Value, Object)],
    output: Option<Output>,
    single: bool,
    now: Timestamp,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    match output {
        None | Some(Output::Wide) => {
            if found.is_empty() {
                if kind.namespaced() && !ctx.all_namespaces {
                    writeln!(err, "No resources found in {} namespace.", ctx.namespace())?;
                } else {
                    writeln!(err, "No resources found")?;
                }
                return Ok(());
            }
            let objects: Vec<Object> = found.iter().map(|(_, o)| o.clone()).collect();
            let wide = output == Some(Output::Wide);
            out.write_all(
                render_objects(kind, &objects, wide, ctx.all_namespaces, now).as_bytes(),
            )?;
        }
        Some(Output::Name) => {
            for (_, obj) in found {
                writeln!(out, "{}", object_ref(kind, obj.name()))?;
            }
        }
        Some(Output::Json) => {
            let doc = document(kind, found, single);
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
        Some(Output::Yaml) => {
            let doc = document(kind, found, single);
            let yaml = serde_saphyr::to_string(&doc).context("rendering YAML")?;
            out.write_all(yaml.as_bytes())?;
            if !yaml.ends_with('\n') {
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

/// One object as the server sent it, or a `v1 List` whose items carry
/// apiVersion and kind.
pub fn document(kind: Kind, found: &[(Value, Object)], single: bool) -> Value {
    if single && found.len() == 1 {
        return found[0].0.clone();
    }
    let items: Vec<Value> = found
        .iter()
        .map(|(raw, _)| {
            let mut item = raw.clone();
            if let Some(map) = item.as_object_mut() {
                map.entry("apiVersion")
                    .or_insert_with(|| kind.api_version().into());
                map.entry("kind").or_insert_with(|| kind.name().into());
            }
            item
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items,
        "metadata": {"resourceVersion": ""},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Client, ServerUrl};

    fn ctx(ns: Option<&str>, all: bool) -> Context {
        Context {
            client: Client::new(ServerUrl::parse("http://127.0.0.1:1").unwrap(), None).unwrap(),
            namespace: ns.map(str::to_string),
            all_namespaces: all,
        }
    }

    fn svc(name: &str) -> (Value, Object) {
        let raw = json!({"metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIPs": ["10.96.0.2"], "ports": [{"port": 80, "protocol": "TCP"}]}});
        let obj = Object::from_value_as(Kind::Service, raw.clone()).unwrap();
        (raw, obj)
    }

    fn render(
        c: &Context,
        kind: Kind,
        found: &[(Value, Object)],
        o: Option<Output>,
        single: bool,
    ) -> (String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let now: Timestamp = "2025-06-01T12:00:00Z".parse().unwrap();
        print(c, kind, found, o, single, now, &mut out, &mut err).unwrap();
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn kinds_and_unknown_kind() {
        for (w, k) in [
            ("svc", Kind::Service),
            ("services", Kind::Service),
            ("po", Kind::Pod),
            ("pods", Kind::Pod),
            ("no", Kind::Node),
            ("nodes", Kind::Node),
            ("ns", Kind::Namespace),
            ("namespaces", Kind::Namespace),
            ("endpointslices", Kind::EndpointSlice),
        ] {
            assert_eq!(parse_kind(w).unwrap(), k, "{w}");
        }
        assert_eq!(
            parse_kind("foo").unwrap_err().to_string(),
            "the server doesn't have a resource type \"foo\""
        );
    }

    #[test]
    fn empty_results_message() {
        let (out, err) = render(&ctx(None, false), Kind::Service, &[], None, false);
        assert_eq!(
            (out.as_str(), err.as_str()),
            ("", "No resources found in default namespace.\n")
        );
        let (_, err) = render(&ctx(Some("shop"), false), Kind::Pod, &[], None, false);
        assert_eq!(err, "No resources found in shop namespace.\n");
        let (_, err) = render(&ctx(None, true), Kind::Pod, &[], None, false);
        assert_eq!(err, "No resources found\n");
        let (_, err) = render(&ctx(None, false), Kind::Node, &[], None, false);
        assert_eq!(err, "No resources found\n");
        // Machine formats print an empty List instead.
        let (out, err) = render(
            &ctx(None, false),
            Kind::Node,
            &[],
            Some(Output::Json),
            false,
        );
        assert_eq!(err, "");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["kind"], "List");
        assert_eq!(v["items"], json!([]));
    }

    #[test]
    fn json_yaml_name_outputs() {
        let c = ctx(None, false);
        let one = [svc("web")];
        let (out, _) = render(&c, Kind::Service, &one, Some(Output::Json), true);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v, one[0].0,
            "a single object is shown as the server sent it"
        );
        assert!(out.contains("\n  \"metadata\": {"), "pretty printed: {out}");

        let two = [svc("a"), svc("b")];
        let (out, _) = render(&c, Kind::Service, &two, Some(Output::Json), false);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "List");
        assert_eq!(v["items"][1]["metadata"]["name"], "b");
        assert_eq!(v["items"][0]["kind"], "Service");
        assert_eq!(v["items"][0]["apiVersion"], "v1");

        let (out, _) = render(&c, Kind::Service, &two, Some(Output::Yaml), false);
        assert!(out.contains("kind: List"), "{out}");
        let back: Value = serde_saphyr::from_str(&out).unwrap();
        assert_eq!(back["items"][0]["spec"]["ports"][0]["port"], 80);

        let (out, _) = render(&c, Kind::Service, &two, Some(Output::Name), false);
        assert_eq!(out, "service/a\nservice/b\n");
    }

    #[test]
    fn table_output_with_all_namespaces() {
        let (out, _) = render(&ctx(None, true), Kind::Service, &[svc("web")], None, false);
        assert_eq!(
            out,
            "NAMESPACE   NAME   TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)   AGE\n\
             default     web    ClusterIP   10.96.0.2    <none>        80/TCP    <unknown>\n"
        );
    }
}
