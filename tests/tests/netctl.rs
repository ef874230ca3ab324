//! netctl against the real control plane: apply (created / unchanged /
//! configured), get as tables and JSON, invalid manifests, delete.

use std::process::{Command, Output};
use weft_e2e::{bin, ControlProcess, TempDir, ADMIN_TOKEN};

fn netctl(cp: &ControlProcess, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(bin("netctl").unwrap());
    cmd.args(["--server", &cp.server(), "--token", ADMIN_TOKEN])
        .args(args);
    match stdin {
        None => cmd.output().unwrap(),
        Some(text) => {
            use std::io::Write;
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }
    }
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  type: NodePort
  ports: [{port: 8080, nodePort: 30080}]
"#;

#[test]
fn apply_get_delete_against_the_control_plane() {
    let dir = TempDir::new("netctl");
    let cp = ControlProcess::start(&dir.0, &[]).unwrap();

    let o = netctl(&cp, &["apply", "-f", "-"], Some(MANIFEST));
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        "namespace/shop created\nservice/web created\nservice/api created\n"
    );

    // applying the same manifest again changes nothing; a change is "configured"
    let o = netctl(&cp, &["apply", "-f", "-"], Some(MANIFEST));
    assert_eq!(
        out(&o),
        "namespace/shop unchanged\nservice/web unchanged\nservice/api unchanged\n",
        "{}",
        err(&o)
    );
    let changed = MANIFEST.replace("port: 80,", "port: 81,");
    let o = netctl(&cp, &["apply", "-f", "-"], Some(&changed));
    assert!(
        out(&o).contains("service/web configured"),
        "{}{}",
        out(&o),
        err(&o)
    );

    // tables
    let o = netctl(&cp, &["get", "svc", "-n", "shop"], None);
    let table = out(&o);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME")
            && lines[0].contains("CLUSTER-IP")
            && lines[0].contains("PORT(S)"),
        "{table}"
    );
    assert!(table.contains("8080:30080/TCP"), "{table}");
    assert!(table.contains("81/TCP"), "{table}");
    let o = netctl(&cp, &["get", "services", "-A", "-o", "wide"], None);
    assert!(
        out(&o).lines().next().unwrap().starts_with("NAMESPACE"),
        "{}",
        out(&o)
    );
    assert!(out(&o).contains("app=web"), "{}", out(&o));
    let o = netctl(
        &cp,
        &["get", "svc", "web", "-n", "shop", "-o", "json"],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .starts_with("198.19."));
    let o = netctl(&cp, &["get", "ns"], None);
    for ns in ["default", "kube-system", "shop"] {
        assert!(out(&o).contains(ns), "{}", out(&o));
    }

    // an invalid manifest: the server's field error, non-zero exit, nothing stored
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec:\n  ports: [{port: 70000}]\n";
    let o = netctl(&cp, &["apply", "-f", "-"], Some(bad));
    assert!(!o.status.success());
    assert!(
        err(&o).contains("spec.ports[0].port: Invalid value: 70000"),
        "{}",
        err(&o)
    );
    let o = netctl(&cp, &["get", "svc", "bad", "-n", "shop"], None);
    assert!(!o.status.success());
    assert!(err(&o).contains("not found"), "{}", err(&o));

    // delete
    let o = netctl(&cp, &["delete", "svc", "web", "-n", "shop"], None);
    assert_eq!(out(&o), "service \"web\" deleted\n", "{}", err(&o));
    let o = netctl(&cp, &["delete", "svc", "web", "-n", "shop"], None);
    assert!(!o.status.success());
    assert!(err(&o).contains("NotFound"), "{}", err(&o));
}
