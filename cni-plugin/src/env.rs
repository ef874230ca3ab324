//! The CNI execution environment (`CNI_*` variables): parsing and validation.
//! Pure: the caller supplies a lookup function, so tests build it from a map.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{CniError, Result};

/// The verbs of the CNI 1.1 protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    /// Environment variables the spec marks required for this verb
    /// (besides `CNI_COMMAND`).
    pub fn required_env(self) -> &'static [&'static str] {
        match self {
            Command::Add => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
            Command::Gc => &["CNI_PATH"],
            Command::Status | Command::Version => &[],
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        })
    }
}

pub use weft_model::node_state::PodRef;

/// A validated invocation environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// Empty for STATUS, GC and VERSION.
    pub container_id: String,
    /// `None` when unset or empty (allowed for DEL).
    pub netns: Option<String>,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
    pub path: Vec<String>,
    pub pod: PodRef,
}

/// Only the command, so that stdin can be interpreted before the rest of the
/// environment is validated.
pub fn command(get: &dyn Fn(&str) -> Option<String>) -> Result<Command> {
    match get("CNI_COMMAND") {
        None => Err(CniError::InvalidEnv {
            problems: vec!["CNI_COMMAND is not set".into()],
        }),
        Some(c) if c.is_empty() => Err(CniError::InvalidEnv {
            problems: vec!["CNI_COMMAND is empty".into()],
        }),
        Some(c) => Command::parse(&c).ok_or_else(|| CniError::InvalidEnv {
            problems: vec![format!(
                "CNI_COMMAND={c:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
            )],
        }),
    }
}

/// Parse and validate the whole environment for `command`; every problem is
/// reported in one error.
pub fn parse(get: &dyn Fn(&str) -> Option<String>) -> Result<CniEnv> {
    let command = command(get)?;
    let mut problems = Vec::new();
    let value = |k: &str| get(k).filter(|v| !v.is_empty());
    for key in command.required_env() {
        if value(key).is_none() {
            problems.push(format!("{key} is required for {command} but is not set"));
        }
    }
    let uses_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
    let container_id = if uses_attachment {
        value("CNI_CONTAINERID").unwrap_or_default()
    } else {
        String::new()
    };
    if !container_id.is_empty() {
        if let Err(why) = validate_container_id(&container_id) {
            problems.push(format!("CNI_CONTAINERID={container_id:?}: {why}"));
        }
    }
    let ifname = if uses_attachment {
        value("CNI_IFNAME").unwrap_or_default()
    } else {
        String::new()
    };
    if !ifname.is_empty() {
        if let Err(why) = validate_ifname(&ifname) {
            problems.push(format!("CNI_IFNAME={ifname:?}: {why}"));
        }
    }
    let netns = if uses_attachment {
        value("CNI_NETNS")
    } else {
        None
    };
    if let Some(ns) = &netns {
        if !ns.starts_with('/') {
            problems.push(format!("CNI_NETNS={ns:?}: must be an absolute path"));
        }
    }
    let (args, pod) = match parse_args(get("CNI_ARGS").as_deref().unwrap_or("")) {
        Ok(v) => v,
        Err(why) => {
            problems.push(format!("CNI_ARGS: {why}"));
            Default::default()
        }
    };
    if !problems.is_empty() {
        return Err(CniError::InvalidEnv { problems });
    }
    let path = value("CNI_PATH")
        .map(|p| {
            p.split(':')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    Ok(CniEnv {
        command,
        container_id,
        netns,
        ifname,
        args,
        path,
        pod,
    })
}

/// Container IDs: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (spec, "Attachment parameters").
pub fn validate_container_id(id: &str) -> std::result::Result<(), &'static str> {
    let mut chars = id.chars();
    match chars.next() {
        None => return Err("must not be empty"),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err("must start with an alphanumeric character")
        }
        _ => {}
    }
    if chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err("may only contain alphanumerics, '_', '.' and '-'")
    }
}

/// Interface names: what the kernel accepts (IFNAMSIZ-1 bytes, not `.`/`..`,
/// no `/`, `:` or whitespace).
pub fn validate_ifname(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 15 {
        return Err("must be at most 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("must not be '.' or '..'");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err("must not contain '/', ':', NUL or whitespace");
    }
    Ok(())
}

/// `CNI_ARGS`: `K=V;K=V`. Unknown keys are kept and ignored.
pub fn parse_args(raw: &str) -> std::result::Result<(BTreeMap<String, String>, PodRef), String> {
    let mut map = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not KEY=VALUE"))?;
        if k.is_empty() {
            return Err(format!("{pair:?} has an empty key"));
        }
        map.insert(k.to_string(), v.to_string());
    }
    let get = |k: &str| map.get(k).filter(|v| !v.is_empty()).cloned();
    let pod = PodRef {
        namespace: get("K8S_POD_NAMESPACE"),
        name: get("K8S_POD_NAME"),
        uid: get("K8S_POD_UID"),
    };
    Ok((map, pod))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn problems(r: Result<CniEnv>) -> Vec<String> {
        match r {
            Err(CniError::InvalidEnv { problems }) => problems,
            other => panic!("expected InvalidEnv, got {other:?}"),
        }
    }

    #[test]
    fn add_reports_every_missing_variable_at_once() {
        let p = problems(parse(&env(&[("CNI_COMMAND", "ADD")])));
        assert_eq!(p.len(), 3, "{p:?}");
        for key in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            assert!(p.iter().any(|m| m.contains(key)), "{key} in {p:?}");
        }
    }

    #[test]
    fn missing_and_invalid_are_reported_together() {
        let p = problems(parse(&env(&[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "-bad"),
            ("CNI_IFNAME", "eth/0"),
        ])));
        assert!(p.iter().any(|m| m.contains("CNI_NETNS")));
        assert!(p.iter().any(|m| m.contains("CNI_PATH")));
        assert!(p.iter().any(|m| m.contains("CNI_CONTAINERID=\"-bad\"")));
        assert!(p.iter().any(|m| m.contains("CNI_IFNAME=\"eth/0\"")));
    }

    #[test]
    fn command_is_required_and_known() {
        assert_eq!(problems(parse(&env(&[]))).len(), 1);
        let p = problems(parse(&env(&[("CNI_COMMAND", "ATTACH")])));
        assert!(p[0].contains("ATTACH"));
    }

    #[test]
    fn del_allows_empty_netns() {
        let e = parse(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]))
        .unwrap();
        assert_eq!(e.netns, None);
        assert_eq!(e.command, Command::Del);
    }

    #[test]
    fn status_gc_version_need_little() {
        assert!(parse(&env(&[("CNI_COMMAND", "STATUS")])).is_ok());
        assert!(parse(&env(&[("CNI_COMMAND", "VERSION"), ("CNI_NETNS", "dummy")])).is_ok());
        let p = problems(parse(&env(&[("CNI_COMMAND", "GC")])));
        assert!(p[0].contains("CNI_PATH"));
        assert!(parse(&env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")])).is_ok());
    }

    #[test]
    fn container_id_syntax() {
        for ok in ["a", "0abc", "abc_def.g-h", "f3b1c0ffee"] {
            assert!(validate_container_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "_a", ".a", "a/b", "a b", "a:b", "ä"] {
            assert!(validate_container_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ifname_syntax() {
        for ok in ["eth0", "net1", "a", "fifteen-bytes-x"] {
            assert!(validate_ifname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-bytes-xx",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cni_args_carry_pod_identity() {
        let (map, pod) = parse_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u-1;K8S_POD_INFRA_CONTAINER_ID=x",
        )
        .unwrap();
        assert_eq!(map.len(), 5);
        assert_eq!(pod.namespace.as_deref(), Some("default"));
        assert_eq!(pod.name.as_deref(), Some("web-0"));
        assert_eq!(pod.uid.as_deref(), Some("u-1"));
        assert!(parse_args("novalue").is_err());
        assert_eq!(parse_args("").unwrap().1, PodRef::default());
    }
}
