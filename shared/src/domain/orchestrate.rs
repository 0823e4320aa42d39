//! `POST /v1/orchestrate`'s rules: the modes of both client generations, the route a request
//! takes, the vocabulary its answer's `status` speaks, and which intents are dangerous
//! (docs/orchestrate-design.md).

use std::{fmt, str::FromStr};

/// `mode` as a request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Wait up to the limit, then 202 (current clients; also the default).
    Sync,
    /// 202 at once (current clients).
    Async,
    /// The seed's: choose the route and say which.
    Auto,
    /// The seed's: run a job kind.
    Agent,
    /// The seed's: start a workflow.
    Flow,
    /// The seed's: call a tool on an MCP server (`mcp.call`).
    Mcp,
}

impl Mode {
    pub const NAMES: &'static str = "auto, agent, flow, mcp, sync or async";

    /// The mode of a request that names none: the existing behaviour.
    pub fn of(named: Option<&str>) -> Result<Mode, String> {
        match named {
            None => Ok(Mode::Sync),
            Some(m) => m.parse(),
        }
    }

    /// Whether the answer's `status` speaks the seed's vocabulary (`success | accepted | error`).
    pub fn seed_vocabulary(self) -> bool {
        !matches!(self, Mode::Sync | Mode::Async)
    }

    /// Whether the answer waits for the end (up to the limit).
    pub fn waits(self) -> bool {
        self != Mode::Async
    }

    /// The route this mode insists on (`None`: chosen from the intent).
    pub fn route(self) -> Option<Route> {
        match self {
            Mode::Agent => Some(Route::Agent),
            Mode::Flow => Some(Route::Flow),
            Mode::Mcp => Some(Route::Mcp),
            Mode::Sync | Mode::Async | Mode::Auto => None,
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "sync" => Mode::Sync,
            "async" => Mode::Async,
            "auto" => Mode::Auto,
            "agent" => Mode::Agent,
            "flow" => Mode::Flow,
            "mcp" => Mode::Mcp,
            other => return Err(format!("unknown mode `{other}` ({})", Mode::NAMES)),
        })
    }
}

/// What an orchestrate request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A job of the intent's kind.
    Agent,
    /// A run of the intent's workflow.
    Flow,
    /// An `mcp.call` job for the tool the intent names.
    Mcp,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Agent => "agent",
            Route::Flow => "flow",
            Route::Mcp => "mcp",
        }
    }

    /// The seed's heuristic for `auto`: an `mcp` object in the body calls a tool; otherwise the
    /// intent's sort decides (a kind runs as a job, a workflow starts a run).
    pub fn choose(has_mcp: bool, is_kind: bool, is_workflow: bool) -> Option<Route> {
        if has_mcp {
            Some(Route::Mcp)
        } else if is_kind {
            Some(Route::Agent)
        } else if is_workflow {
            Some(Route::Flow)
        } else {
            None
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The seed's `status` for work that is `terminal` with `succeeded` (or still running).
pub fn seed_status(terminal: bool, succeeded: bool) -> &'static str {
    match (terminal, succeeded) {
        (false, _) => "accepted",
        (true, true) => "success",
        (true, false) => "error",
    }
}

/// Names of dangerous intents (`CAPIBARA_ORCHESTRATE_DANGEROUS`): exact names, or `prefix*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DangerList(Vec<String>);

impl DangerList {
    pub const DEFAULT: &'static str = "ssh.exec,shell.exec";

    pub fn matches(&self, intent: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => intent.starts_with(prefix),
            None => p == intent,
        })
    }
}

impl FromStr for DangerList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut names = Vec::new();
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if p.trim_end_matches('*').contains('*') {
                return Err(format!("`{p}`: `*` may only end a name"));
            }
            names.push(p.to_string());
        }
        Ok(DangerList(names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_keep_the_existing_vocabulary_unless_a_seed_mode_is_named() {
        assert_eq!(Mode::of(None), Ok(Mode::Sync));
        assert!(!Mode::of(None).unwrap().seed_vocabulary());
        assert!(!Mode::Async.seed_vocabulary());
        assert!(!Mode::Async.waits());
        for m in ["auto", "agent", "flow", "mcp"] {
            assert!(m.parse::<Mode>().unwrap().seed_vocabulary(), "{m}");
        }
        assert!("fast".parse::<Mode>().unwrap_err().contains("auto, agent"));
    }

    #[test]
    fn auto_prefers_an_mcp_body_then_a_kind_then_a_workflow() {
        assert_eq!(Route::choose(true, true, true), Some(Route::Mcp));
        assert_eq!(Route::choose(false, true, true), Some(Route::Agent));
        assert_eq!(Route::choose(false, false, true), Some(Route::Flow));
        assert_eq!(Route::choose(false, false, false), None);
    }

    #[test]
    fn seed_statuses() {
        assert_eq!(seed_status(false, false), "accepted");
        assert_eq!(seed_status(true, true), "success");
        assert_eq!(seed_status(true, false), "error");
    }

    #[test]
    fn danger_list_takes_names_and_prefixes() {
        let d: DangerList = "ssh.exec, deploy.*,,".parse().unwrap();
        assert!(d.matches("ssh.exec"));
        assert!(!d.matches("ssh.execute"));
        assert!(d.matches("deploy.prod"));
        assert!(!d.matches("echo"));
        assert!("a*b".parse::<DangerList>().is_err());
        assert!(!"".parse::<DangerList>().unwrap().matches(""));
    }
}
