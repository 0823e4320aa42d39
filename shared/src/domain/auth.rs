use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// What an API key may do. `admin` implies `submit`, which implies `read`. `worker` may only
/// register workers, lease jobs and report on them (docs/workers.md); `admin` implies it too.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Submit,
    Admin,
    Worker,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Read, Role::Submit, Role::Admin, Role::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Admin => "admin",
            Role::Worker => "worker",
        }
    }

    /// Whether a key holding `self` may act where `needed` is required.
    pub fn grants(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Admin, _) | (Role::Worker, Role::Worker) => true,
            (Role::Worker, _) | (_, Role::Worker) => false,
            (held, needed) => held >= needed,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Role::Read),
            "submit" => Ok(Role::Submit),
            "admin" => Ok(Role::Admin),
            "worker" => Ok(Role::Worker),
            other => Err(format!(
                "unknown role `{other}` (expected admin, submit, read or worker)"
            )),
        }
    }
}

/// A namespace name: 1–63 chars of `[a-z0-9-_]`.
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err("must be 1-63 characters of a-z, 0-9, '-' or '_'".into())
    }
}

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn a_worker_key_may_only_act_as_a_worker_and_admin_may_too() {
        assert!(Role::Worker.grants(Role::Worker));
        assert!(!Role::Worker.grants(Role::Read));
        assert!(!Role::Worker.grants(Role::Submit));
        assert!(Role::Admin.grants(Role::Worker));
        assert!(!Role::Submit.grants(Role::Worker));
        assert!(!Role::Read.grants(Role::Worker));
        assert!(Role::Submit.grants(Role::Read) && !Role::Read.grants(Role::Submit));
    }
}
