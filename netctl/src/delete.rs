//! `netctl delete KIND NAME...` and `netctl delete -f FILE|-`.

use crate::get::parse_kind;
use crate::source::{load_objects, read_sources};
use crate::{object_path, report, type_name, Context};
use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;
use weft_model::Kind;

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Resource type and names: `svc web api`.
    pub args: Vec<String>,
    /// Delete the objects in a manifest file, directory, or `-` for stdin (repeatable).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<String>,
}

/// The objects to delete: (kind, namespace, name).
pub fn targets(ctx: &Context, args: &DeleteArgs) -> Result<Vec<(Kind, String, String)>> {
    if !args.files.is_empty() {
        if !args.args.is_empty() {
            bail!("names cannot be given together with -f");
        }
        let objects = load_objects(&read_sources(&args.files)?, ctx.namespace.as_deref())?;
        if objects.is_empty() {
            bail!("no objects passed to delete");
        }
        return Ok(objects
            .iter()
            .map(|o| (o.kind(), o.namespace().to_string(), o.name().to_string()))
            .collect());
    }
    let Some((kind, names)) = args.args.split_first() else {
        bail!("you must provide one or more resources by argument or filename (-f)");
    };
    let kind = parse_kind(kind)?;
    if names.is_empty() {
        bail!("resource(s) were provided, but no name was specified");
    }
    let ns = if kind.namespaced() {
        ctx.namespace().to_string()
    } else {
        String::new()
    };
    Ok(names
        .iter()
        .map(|n| (kind, ns.clone(), n.clone()))
        .collect())
}

pub async fn run(
    ctx: &Context,
    args: &DeleteArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool> {
    let mut ok = true;
    for (kind, ns, name) in targets(ctx, args)? {
        let resp = ctx.client.delete(&object_path(kind, &ns, &name)).await?;
        if resp.is_success() {
            writeln!(out, "{} \"{name}\" deleted", type_name(kind))?;
        } else {
            report(err, &resp.api_error().or_not_found(kind, &name))?;
            ok = false;
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Client, ServerUrl};

    fn ctx(ns: Option<&str>) -> Context {
        Context {
            client: Client::new(ServerUrl::parse("http://127.0.0.1:1").unwrap(), None).unwrap(),
            namespace: ns.map(str::to_string),
            all_namespaces: false,
        }
    }

    fn args(a: &[&str]) -> DeleteArgs {
        DeleteArgs {
            args: a.iter().map(|s| s.to_string()).collect(),
            files: vec![],
        }
    }

    #[test]
    fn targets_by_name() {
        let t = targets(&ctx(Some("shop")), &args(&["svc", "a", "b"])).unwrap();
        assert_eq!(
            t,
            [
                (Kind::Service, "shop".to_string(), "a".to_string()),
                (Kind::Service, "shop".to_string(), "b".to_string())
            ]
        );
        let t = targets(&ctx(Some("shop")), &args(&["no", "n1"])).unwrap();
        assert_eq!(t, [(Kind::Node, String::new(), "n1".to_string())]);
        assert!(targets(&ctx(None), &args(&["svc"])).is_err());
        assert!(targets(&ctx(None), &args(&[])).is_err());
        assert_eq!(
            targets(&ctx(None), &args(&["widgets", "x"]))
                .unwrap_err()
                .to_string(),
            "the server doesn't have a resource type \"widgets\""
        );
    }
}
