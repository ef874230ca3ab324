//! Reading `-f` arguments (files, directories, `-` for stdin) into objects,
//! with kubectl's namespace rules.

use anyhow::{bail, Context as _, Result};
use std::io::Read;
use std::path::Path;
use weft_model::{parse_manifests, Object};

/// One manifest's text and where it came from.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// Read every `-f` argument: a file, a directory (its `.yaml`, `.yml` and
/// `.json` files, sorted) or `-` (stdin, once).
pub fn read_sources(files: &[String]) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    let mut stdin_read = false;
    for f in files {
        if f == "-" {
            if stdin_read {
                bail!("-f - (stdin) may be given only once");
            }
            stdin_read = true;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading manifests from stdin")?;
            out.push(Source {
                name: "stdin".into(),
                text,
            });
            continue;
        }
        let path = Path::new(f);
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("the path {f:?} does not exist")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {f}")),
        };
        if meta.is_dir() {
            let mut entries = Vec::new();
            for e in std::fs::read_dir(path).with_context(|| format!("reading directory {f}"))? {
                let p = e.with_context(|| format!("reading directory {f}"))?.path();
                let manifest = p
                    .extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"));
                if manifest && p.is_file() {
                    entries.push(p);
                }
            }
            entries.sort();
            for p in entries {
                out.push(read_file(&p)?);
            }
        } else {
            out.push(read_file(path)?);
        }
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<Source> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Source {
        name: path.display().to_string(),
        text,
    })
}

/// Parse every source and settle each object's namespace; errors name the source.
pub fn load_objects(sources: &[Source], explicit_ns: Option<&str>) -> Result<Vec<Object>> {
    let mut out = Vec::new();
    for src in sources {
        // The manifest error's text already includes its cause: show it once.
        let objs = parse_manifests(&src.text)
            .map_err(|e| anyhow::anyhow!("error parsing {}: {e}", src.name))?;
        for mut obj in objs {
            if obj.name().is_empty() {
                bail!("{}: a {} has no metadata.name", src.name, obj.kind().name());
            }
            resolve_namespace(&mut obj, explicit_ns).with_context(|| src.name.clone())?;
            out.push(obj);
        }
    }
    Ok(out)
}

/// Give a namespaced object without `metadata.namespace` the `-n` namespace
/// (or `default`); refuse a manifest namespace that contradicts an explicit
/// `-n`, like kubectl. Cluster-scoped objects carry no namespace.
pub fn resolve_namespace(obj: &mut Object, explicit_ns: Option<&str>) -> Result<()> {
    let kind = obj.kind();
    let name = obj.name().to_string();
    let meta = obj.meta_mut();
    if !kind.namespaced() {
        meta.namespace = None;
        return Ok(());
    }
    match (
        meta.namespace.as_deref().filter(|n| !n.is_empty()),
        explicit_ns,
    ) {
        (Some(mine), Some(flag)) if mine != flag => bail!(
            "{}: the namespace from the provided object \"{mine}\" does not match the namespace \
             \"{flag}\". You must pass '--namespace={mine}' to perform this operation.",
            crate::object_ref(kind, &name)
        ),
        (Some(_), _) => {}
        (None, flag) => meta.namespace = Some(flag.unwrap_or(crate::DEFAULT_NAMESPACE).to_string()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n1, namespace: ignored}\n";

    fn src(text: &str) -> Vec<Source> {
        vec![Source {
            name: "web.yaml".into(),
            text: text.into(),
        }]
    }

    #[test]
    fn defaults_namespaces() {
        let objs = load_objects(&src(TWO), None).unwrap();
        assert_eq!(objs[0].namespace(), "default");
        assert_eq!(objs[1].meta().namespace, None);
        let objs = load_objects(&src(TWO), Some("shop")).unwrap();
        assert_eq!(objs[0].meta().namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn manifest_namespace_wins_unless_it_conflicts() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n";
        let objs = load_objects(&src(text), None).unwrap();
        assert_eq!(objs[0].namespace(), "shop");
        let objs = load_objects(&src(text), Some("shop")).unwrap();
        assert_eq!(objs[0].namespace(), "shop");
        let err = load_objects(&src(text), Some("default")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.starts_with("web.yaml: service/web: the namespace from the provided object \"shop\" does not match the namespace \"default\". You must pass '--namespace=shop'"), "{msg}");
    }

    #[test]
    fn parse_errors_name_file_and_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: eighty\n";
        let msg = format!("{:#}", load_objects(&src(text), None).unwrap_err());
        assert!(
            msg.starts_with("error parsing web.yaml: document 2"),
            "{msg}"
        );
        assert!(msg.contains("spec.ports[0].port"), "{msg}");
        assert_eq!(msg.matches("spec.ports[0].port").count(), 1, "{msg}");

        let msg = format!(
            "{:#}",
            load_objects(
                &src("apiVersion: v1\nkind: Service\nmetadata: {labels: {a: b}}\n"),
                None
            )
            .unwrap_err()
        );
        assert_eq!(msg, "web.yaml: a Service has no metadata.name");
    }

    #[test]
    fn reads_directories_sorted() {
        let dir = std::env::temp_dir().join(format!("netctl-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("a.json"),
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let sources = read_sources(&[dir.display().to_string()]).unwrap();
        let objs = load_objects(&sources, None).unwrap();
        assert_eq!(
            objs.iter().map(|o| o.name()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let err = read_sources(&[dir.join("nope.yaml").display().to_string()]).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
