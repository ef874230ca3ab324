//! Authentication by bearer token (a Kubernetes static token file) and the
//! authorization rules: `system:masters` may do anything; a node
//! (`system:node:<name>` in group `system:nodes`) may read its own stream and
//! change only its own Node and the Pods bound to it; other users may read.

use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

pub const ADMIN_GROUP: &str = "system:masters";
pub const NODES_GROUP: &str = "system:nodes";
pub const NODE_USER_PREFIX: &str = "system:node:";

impl Identity {
    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == ADMIN_GROUP)
    }

    /// The node this identity speaks for, if it is a node.
    pub fn node(&self) -> Option<&str> {
        if !self.groups.iter().any(|g| g == NODES_GROUP) {
            return None;
        }
        self.user.strip_prefix(NODE_USER_PREFIX)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading token file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Tokens from a Kubernetes static token file: `token,user,uid[,"group1,group2"]`.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, Identity>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Tokens::parse(&text).map_err(|(line, reason)| TokenFileError::Line {
            path: path.display().to_string(),
            line,
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Tokens, (usize, String)> {
        let mut by_token = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = split_csv(line);
            if fields.len() < 3 {
                return Err((i + 1, "expected token,user,uid[,\"groups\"]".into()));
            }
            let (token, user) = (fields[0].trim(), fields[1].trim());
            if token.is_empty() || user.is_empty() {
                return Err((i + 1, "token and user must not be empty".into()));
            }
            let groups = fields
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            if by_token
                .insert(
                    token.to_string(),
                    Identity {
                        user: user.to_string(),
                        groups,
                    },
                )
                .is_some()
            {
                return Err((i + 1, "duplicate token".into()));
            }
        }
        Ok(Tokens { by_token })
    }

    /// The identity of an `Authorization` header value, if the token is known.
    pub fn authenticate(&self, header: Option<&str>) -> Option<&Identity> {
        let token = header?.strip_prefix("Bearer ")?.trim();
        // Compare in constant time per candidate so timing does not leak a prefix.
        self.by_token
            .iter()
            .find(|(t, _)| constant_time_eq(t.as_bytes(), token.as_bytes()))
            .map(|(_, id)| id)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Split one CSV line, honouring double quotes.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// What a request wants to do, for authorization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Read,
    Write,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_static_token_file() {
        let t = Tokens::parse(
            "# comment\nadmintoken,admin,1,\"system:masters\"\nn1tok,system:node:n1,2,\"system:nodes\"\nviewer,bob,3\n",
        )
        .unwrap();
        let admin = t.authenticate(Some("Bearer admintoken")).unwrap();
        assert!(admin.is_admin());
        let n1 = t.authenticate(Some("Bearer n1tok")).unwrap();
        assert_eq!(n1.node(), Some("n1"));
        assert!(!n1.is_admin());
        let bob = t.authenticate(Some("Bearer viewer")).unwrap();
        assert_eq!(bob.node(), None);
        assert!(t.authenticate(Some("Bearer nope")).is_none());
        assert!(t.authenticate(Some("Basic admintoken")).is_none());
        assert!(t.authenticate(None).is_none());
        assert_eq!(Tokens::parse("x,y").unwrap_err().0, 1);
        assert!(Tokens::parse("a,u,1\na,v,2").is_err());
    }
}
