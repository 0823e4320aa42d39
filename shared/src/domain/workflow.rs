//! Workflow definitions: the DAG of steps, its validation at definition time, and the
//! `workflows` projection (every version of a definition is kept; runs pin one).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{
    event::{DomainEvent, StreamType},
    kinds::{self, KindContext},
    retry::Backoff,
    template, FieldError,
};

/// Step kinds handled by the workflow engine itself (no job kind of that name exists).
pub const CONTROL_KINDS: [&str; 4] = ["wait", "approval", "map", "workflow"];

/// Internal job kind a `wait` step runs as: a delayed job that does nothing (durable timer).
pub const WAIT_KIND: &str = "workflow.wait";

/// Most steps in one definition.
pub const MAX_STEPS: usize = 500;
/// Most children of one `map` step.
pub const MAX_MAP_ITEMS: usize = 10_000;

/// A workflow definition (contract shape, DESIGN §6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema a run's `input` must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub input_schema: Option<Value>,
    pub steps: Vec<StepDef>,
    /// Template of the run's output; omitted = every succeeded step's output by step id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// `POST /v1/orchestrate` only dry-runs this workflow unless the request says
    /// `confirm_dangerous: true` (also when a step's kind is dangerous). Plain run starts are
    /// not affected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dangerous: bool,
}

/// One step of a definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    pub id: String,
    /// A job kind (`echo`, `code.run`, …) or a control kind: `wait`, `approval`, `map`, `workflow`.
    pub kind: String,
    /// Template over `input`, `steps.<id>.output|status|error`, `run`.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub input: Value,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Condition (an expression, optionally in `{{ }}`); false = the step is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<StepRetry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Queue of the step's job (default: the kind's queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Attempts of a step's job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepRetry {
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
}

/// What a failed step does to the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The run fails; running steps are canceled.
    #[default]
    FailRun,
    /// Dependents run as if the step had ended (they see `steps.<id>.status == "failed"`).
    Continue,
    /// Dependents (and theirs) are skipped; the rest of the run goes on.
    SkipDependents,
}

/// Input of a `map` step: one child job per item of `items`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapInput {
    /// Template evaluating to a list.
    pub items: Value,
    /// The child step: a job kind and its input template (sees `item` and `index`).
    pub step: MapChild,
    /// Children running at once (default 10).
    #[serde(default = "default_map_concurrency")]
    pub concurrency: u32,
}

fn default_map_concurrency() -> u32 {
    10
}

/// The step a `map` runs per item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapChild {
    pub kind: String,
    #[serde(default = "empty_object")]
    pub input: Value,
}

/// Input of a `wait` step: exactly one of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitInput {
    /// `30s`, `5m`, `2h`, `1d`, or a number of seconds.
    #[serde(default)]
    pub duration: Option<Value>,
    /// An RFC 3339 time (may be a template).
    #[serde(default)]
    pub until: Option<Value>,
}

/// Input of a `workflow` (sub-workflow) step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubWorkflowInput {
    pub workflow_id: Uuid,
    #[serde(default = "empty_object")]
    pub input: Value,
}

/// Parse a `wait` duration: a number of seconds or `<n>ms|s|m|h|d`.
pub fn parse_wait_duration(v: &Value) -> Result<chrono::Duration, String> {
    let ms = match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|s| *s >= 0.0)
            .map(|s| (s * 1000.0) as i64)
            .ok_or("must be a non-negative number of seconds")?,
        Value::String(s) => crate::config::parse_duration(s)
            .map(|d| d.as_millis() as i64)
            .ok_or("must be like `30s`, `5m`, `2h` or `1d`")?,
        _ => return Err("must be a number of seconds or a string like `30s`".into()),
    };
    if ms > 366 * 86_400_000 {
        return Err("must be at most 366 days".into());
    }
    Ok(chrono::Duration::milliseconds(ms))
}

impl WorkflowDef {
    /// Whether a step's input reads `secrets`: writing such a definition is an admin's act, since
    /// the steps receive the values (docs/security.md, "Secrets").
    pub fn references_secrets(&self) -> bool {
        let templates = super::template::Templates::new();
        self.steps
            .iter()
            .any(|s| super::template::uses_variable(&templates, &s.input, "secrets"))
    }

    /// Parse JSON or YAML text (by content type) into a definition; errors name the field.
    pub fn parse(body: &[u8], yaml: bool) -> Result<WorkflowDef, FieldError> {
        if yaml {
            let v: Value = serde_norway::from_slice(body)
                .map_err(|e| FieldError::new("", format!("invalid YAML: {e}")))?;
            Self::from_value(v)
        } else {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| FieldError::new("", format!("invalid JSON: {e}")))?;
            Self::from_value(v)
        }
    }

    /// A definition from JSON; a NUL character anywhere is refused (Postgres cannot store it).
    pub fn from_value(v: Value) -> Result<WorkflowDef, FieldError> {
        super::storable::check_json("", &v)?;
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            FieldError::new(
                if path == "." { String::new() } else { path },
                e.into_inner().to_string(),
            )
        })
    }

    pub fn step(&self, id: &str) -> Option<&StepDef> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// Everything checkable before a run: ids, dependencies, cycles, kinds, templates,
    /// conditions, static inputs (with [`kinds::validate_input`], as a job submitted on its
    /// own), limits. Errors name the step.
    pub fn validate(&self, ctx: &dyn KindContext) -> Result<(), FieldError> {
        let env = template::Templates::new();
        if self.name.trim().is_empty() || self.name.chars().count() > 200 {
            return Err(FieldError::new("name", "must be 1-200 characters"));
        }
        if self.steps.is_empty() {
            return Err(FieldError::new("steps", "must hold at least one step"));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(FieldError::new(
                "steps",
                format!("at most {MAX_STEPS} steps"),
            ));
        }
        if let Some(schema) = &self.input_schema {
            jsonschema::validator_for(schema).map_err(|e| {
                FieldError::new("input_schema", format!("invalid JSON Schema: {e}"))
            })?;
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            let at = |f: &str| format!("steps[{i}].{f}");
            if !valid_step_id(&s.id) {
                return Err(FieldError::new(
                    at("id"),
                    format!(
                        "step id `{}` must be 1-64 letters, digits, '_' or '-'",
                        s.id
                    ),
                ));
            }
            if index.insert(&s.id, i).is_some() {
                return Err(FieldError::new(
                    at("id"),
                    format!("step id `{}` is used twice", s.id),
                ));
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            let at = |f: &str| format!("steps[{i}].{f}");
            let step = |m: String| format!("step `{}`: {m}", s.id);
            let mut seen = HashSet::new();
            for d in &s.depends_on {
                if !index.contains_key(d.as_str()) {
                    return Err(FieldError::new(
                        at("depends_on"),
                        step(format!("depends on unknown step `{d}`")),
                    ));
                }
                if d == &s.id {
                    return Err(FieldError::new(
                        at("depends_on"),
                        step("depends on itself".into()),
                    ));
                }
                if !seen.insert(d) {
                    return Err(FieldError::new(
                        at("depends_on"),
                        step(format!("lists `{d}` twice")),
                    ));
                }
            }
            if let Some(w) = &s.when {
                template::check_condition(&env, w).map_err(|e| {
                    FieldError::new(at("when"), step(format!("bad condition: {e}")))
                })?;
            }
            template::check(&env, &s.input)
                .map_err(|e| FieldError::new(at("input"), step(format!("bad template: {e}"))))?;
            if let Some(r) = &s.retry {
                if !(1..=100).contains(&r.max_attempts) {
                    return Err(FieldError::new(
                        at("retry.max_attempts"),
                        step("must be between 1 and 100".into()),
                    ));
                }
                if let Some(b) = &r.backoff {
                    b.validate()
                        .map_err(|e| FieldError::new(at("retry.backoff"), step(e.message)))?;
                }
            }
            if let Some(t) = s.timeout_s {
                if !(1..=86_400).contains(&t) {
                    return Err(FieldError::new(
                        at("timeout_s"),
                        step("must be between 1 and 86400".into()),
                    ));
                }
            }
            if let Some(q) = &s.queue {
                if q.is_empty()
                    || q.len() > 64
                    || !q
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                {
                    return Err(FieldError::new(
                        at("queue"),
                        step("must be 1-64 characters of letters, digits, '.', '_' or '-'".into()),
                    ));
                }
            }
            validate_kind_input(&s.kind, &s.input, ctx).map_err(|e| {
                let path = if e.field.is_empty() {
                    at("input")
                } else if e.field == "kind" {
                    at("kind")
                } else {
                    format!("steps[{i}].{}", e.field)
                };
                FieldError::new(path, step(e.message))
            })?;
        }
        if let Some(cycle) = find_cycle(&self.steps) {
            let i = index[cycle[0].as_str()];
            return Err(FieldError::new(
                format!("steps[{i}].depends_on"),
                format!("steps form a cycle: {}", cycle.join(" → ")),
            ));
        }
        if let Some(out) = &self.output {
            template::check(&env, out)
                .map_err(|e| FieldError::new("output", format!("bad template: {e}")))?;
        }
        Ok(())
    }
}

fn valid_step_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Check a step's kind and, where it holds no templates, its input. Field names are relative
/// to the step (`kind`, `input.x`).
fn validate_kind_input(kind: &str, input: &Value, ctx: &dyn KindContext) -> Result<(), FieldError> {
    match kind {
        "wait" => {
            let w: WaitInput = serde_json::from_value(input.clone())
                .map_err(|e| FieldError::new("input", e.to_string()))?;
            match (&w.duration, &w.until) {
                (Some(d), None) => {
                    if !template::is_templated(d) {
                        parse_wait_duration(d).map_err(|e| FieldError::new("input.duration", e))?;
                    }
                }
                (None, Some(u)) => {
                    if !template::is_templated(u) {
                        u.as_str()
                            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                            .ok_or_else(|| {
                                FieldError::new("input.until", "must be an RFC 3339 time")
                            })?;
                    }
                }
                _ => {
                    return Err(FieldError::new(
                        "input",
                        "a wait step needs exactly one of `duration` or `until`",
                    ))
                }
            }
            Ok(())
        }
        "approval" => Ok(()),
        "map" => {
            let m: MapInput = serde_json::from_value(input.clone())
                .map_err(|e| FieldError::new("input", e.to_string()))?;
            if !(1..=1000).contains(&m.concurrency) {
                return Err(FieldError::new(
                    "input.concurrency",
                    "must be between 1 and 1000",
                ));
            }
            if !template::is_templated(&m.items) && !m.items.is_array() {
                return Err(FieldError::new(
                    "input.items",
                    "must be a list or a template evaluating to one",
                ));
            }
            if CONTROL_KINDS.contains(&m.step.kind.as_str()) {
                return Err(FieldError::new(
                    "input.step.kind",
                    "a map child must be a job kind",
                ));
            }
            validate_kind_input(&m.step.kind, &m.step.input, ctx).map_err(|e| {
                FieldError::new(
                    match e.field.as_str() {
                        "kind" => "input.step.kind".to_string(),
                        f => format!("input.step.{f}"),
                    },
                    e.message,
                )
            })
        }
        "workflow" => serde_json::from_value::<SubWorkflowInput>(input.clone())
            .map(|_| ())
            .map_err(|e| FieldError::new("input", e.to_string())),
        _ => {
            let user_kind = !kinds::user::is_builtin(kind)
                && !matches!(ctx.user_kind(kind), kinds::UserKindLookup::Missing);
            if kinds::find_public(kind).is_none() && !user_kind {
                return Err(FieldError::new(
                    "kind",
                    format!(
                        "unknown kind `{kind}`; available: {}, {} and this namespace's (GET /v1/kinds)",
                        kinds::names().join(", "),
                        CONTROL_KINDS.join(", ")
                    ),
                ));
            }
            if template::is_templated(input) {
                // Checked when the step's job is submitted, with the input rendered.
                Ok(())
            } else {
                kinds::validate_input(kind, input, ctx).map(|_| ())
            }
        }
    }
}

impl WorkflowDef {
    /// Whether step `id` always runs alone: it is not a `map` (whose items run side by side),
    /// and every other step is upstream or downstream of it, so none can be in flight while it
    /// runs. A chain's steps run alone; the branches of a fan-out do not; the join after them
    /// does. `false` for an id that is not a step (a map item's `id[index]`).
    pub fn runs_alone(&self, id: &str) -> bool {
        let Some(step) = self.steps.iter().find(|s| s.id == id) else {
            return false;
        };
        if step.kind == "map" {
            return false;
        }
        // The steps upstream of `id` (along `depends_on`) and downstream (along its reverse).
        let mut up: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut down: HashMap<&str, Vec<&str>> = HashMap::new();
        for s in &self.steps {
            for d in &s.depends_on {
                up.entry(s.id.as_str()).or_default().push(d.as_str());
                down.entry(d.as_str()).or_default().push(s.id.as_str());
            }
        }
        let mut related: HashSet<&str> = HashSet::from([id]);
        for edges in [&up, &down] {
            let mut todo = vec![id];
            while let Some(at) = todo.pop() {
                for &next in edges.get(at).into_iter().flatten() {
                    if related.insert(next) {
                        todo.push(next);
                    }
                }
            }
        }
        self.steps.iter().all(|s| related.contains(s.id.as_str()))
    }

    /// The job kinds the definition's steps name (map children's included), to resolve the
    /// user kinds among them before [`WorkflowDef::validate`].
    pub fn kind_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.steps {
            out.push(s.kind.clone());
            if let Some(k) = s.input.pointer("/step/kind").and_then(Value::as_str) {
                out.push(k.to_string());
            }
        }
        out
    }

    /// Give each step of a user kind that names no queue the kind's queue (`queue_of` answers
    /// for user kinds), so its jobs reach the workers of that kind: the planner knows only the
    /// built-in kinds' queues.
    pub fn fill_user_kind_queues(&mut self, queue_of: impl Fn(&str) -> Option<String>) {
        for s in &mut self.steps {
            if s.queue.is_some() {
                continue;
            }
            // A map's children run on the map step's queue.
            let child = s.input.pointer("/step/kind").and_then(Value::as_str);
            let kind = if s.kind == "map" {
                child
            } else {
                Some(s.kind.as_str())
            };
            s.queue = kind.and_then(&queue_of);
        }
    }
}

/// A cycle among the steps, as step ids (first repeated at the end), if any.
fn find_cycle(steps: &[StepDef]) -> Option<Vec<String>> {
    let deps: HashMap<&str, &[String]> = steps
        .iter()
        .map(|s| (s.id.as_str(), s.depends_on.as_slice()))
        .collect();
    // 0 = unvisited, 1 = on the stack, 2 = done
    let mut mark: HashMap<&str, u8> = HashMap::new();
    fn visit<'a>(
        id: &'a str,
        deps: &HashMap<&'a str, &'a [String]>,
        mark: &mut HashMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(id) {
            Some(2) => return None,
            Some(1) => {
                let from = stack.iter().position(|s| *s == id).unwrap_or(0);
                let mut cycle: Vec<String> = stack[from..].iter().map(|s| s.to_string()).collect();
                cycle.push(id.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        mark.insert(id, 1);
        stack.push(id);
        for d in deps.get(id).copied().unwrap_or(&[]) {
            if let Some(c) = visit(d.as_str(), deps, mark, stack) {
                return Some(c);
            }
        }
        stack.pop();
        mark.insert(id, 2);
        None
    }
    for s in steps {
        let mut stack = Vec::new();
        if let Some(c) = visit(&s.id, &deps, &mut mark, &mut stack) {
            return Some(c);
        }
    }
    None
}

/// Check a run's input against the definition's `input_schema`.
pub fn check_input(def: &WorkflowDef, input: &Value) -> Result<(), FieldError> {
    let Some(schema) = &def.input_schema else {
        return Ok(());
    };
    let v = jsonschema::validator_for(schema)
        .map_err(|e| FieldError::new("input", format!("the workflow's input_schema: {e}")))?;
    if let Some(err) = v.iter_errors(input).next() {
        let path = err.instance_path().to_string();
        let field = if path.is_empty() {
            "input".to_string()
        } else {
            format!("input{}", path.replace('/', "."))
        };
        return Err(FieldError::new(field, err.to_string()));
    }
    Ok(())
}

/// One stored version of a definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkflowVersion {
    pub version: u32,
    pub definition: WorkflowDef,
    pub created_at: DateTime<Utc>,
}

/// The `workflows` projection row: the latest definition and every earlier one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Workflow {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub description: Option<String>,
    /// Latest definition version (1, 2, …).
    pub version: u32,
    pub versions: Vec<WorkflowVersion>,
    pub deleted: bool,
    pub stream_version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// Events of a workflow stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum WorkflowEvent {
    WorkflowCreated { definition: WorkflowDef },
    WorkflowUpdated { definition: WorkflowDef },
    WorkflowDeleted {},
}

impl DomainEvent for WorkflowEvent {
    const STREAM: StreamType = StreamType::Workflow;

    fn type_name(&self) -> &'static str {
        match self {
            WorkflowEvent::WorkflowCreated { .. } => "WorkflowCreated",
            WorkflowEvent::WorkflowUpdated { .. } => "WorkflowUpdated",
            WorkflowEvent::WorkflowDeleted {} => "WorkflowDeleted",
        }
    }
}

impl Workflow {
    /// The fold (inline projection and rebuild).
    pub fn apply(
        prev: Option<Workflow>,
        id: Uuid,
        namespace: &str,
        e: &WorkflowEvent,
        at: DateTime<Utc>,
    ) -> Option<Workflow> {
        let mut w = match (prev, e) {
            (None, WorkflowEvent::WorkflowCreated { definition }) => Workflow {
                id,
                namespace: namespace.to_string(),
                name: definition.name.clone(),
                description: definition.description.clone(),
                version: 0,
                versions: Vec::new(),
                deleted: false,
                stream_version: 0,
                created_at: at,
                updated_at: at,
                deleted_at: None,
            },
            (None, _) => return None,
            (Some(w), _) => w,
        };
        match e {
            WorkflowEvent::WorkflowCreated { definition }
            | WorkflowEvent::WorkflowUpdated { definition } => {
                w.version += 1;
                w.name = definition.name.clone();
                w.description = definition.description.clone();
                w.versions.push(WorkflowVersion {
                    version: w.version,
                    definition: definition.clone(),
                    created_at: at,
                });
            }
            WorkflowEvent::WorkflowDeleted {} => {
                w.deleted = true;
                w.deleted_at = Some(at);
            }
        }
        w.stream_version += 1;
        w.updated_at = at;
        Some(w)
    }

    pub fn definition(&self, version: u32) -> Option<&WorkflowDef> {
        self.versions
            .iter()
            .find(|v| v.version == version)
            .map(|v| &v.definition)
    }

    pub fn latest(&self) -> Option<&WorkflowDef> {
        self.definition(self.version)
    }
}

/// Steps by id with their index, for callers that look steps up often.
pub fn step_index(def: &WorkflowDef) -> BTreeMap<&str, usize> {
    def.steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn def(steps: Value) -> WorkflowDef {
        WorkflowDef::from_value(json!({"name": "t", "steps": steps})).unwrap()
    }

    #[test]
    fn a_step_runs_alone_when_every_other_step_is_upstream_or_downstream_of_it() {
        let d = def(json!([
            {"id": "root", "kind": "echo"},
            {"id": "x", "kind": "echo", "depends_on": ["root"]},
            {"id": "y", "kind": "echo", "depends_on": ["root"]},
            {"id": "x2", "kind": "echo", "depends_on": ["x"]},
            {"id": "join", "kind": "echo", "depends_on": ["x2", "y"]},
            {"id": "each", "kind": "map", "depends_on": ["join"],
             "input": {"items": "{{ [1, 2] }}", "step": {"kind": "echo"}}},
            {"id": "end", "kind": "echo", "depends_on": ["each"]},
        ]));
        let alone: Vec<&str> = d
            .steps
            .iter()
            .map(|s| s.id.as_str())
            .filter(|id| d.runs_alone(id))
            .collect();
        // `x`, `x2` and `y` are branches; `each` runs its items side by side.
        assert_eq!(alone, ["root", "join", "end"]);
        assert!(!d.runs_alone("each[0]"), "a map item");
        assert!(!d.runs_alone("nope"));
        let chain = def(json!([
            {"id": "a", "kind": "echo"},
            {"id": "b", "kind": "echo", "depends_on": ["a"]},
        ]));
        assert!(chain.runs_alone("a") && chain.runs_alone("b"));
        let apart = def(json!([{"id": "a", "kind": "echo"}, {"id": "b", "kind": "echo"}]));
        assert!(!apart.runs_alone("a") && !apart.runs_alone("b"));
    }

    fn err(steps: Value) -> FieldError {
        def(steps)
            .validate(&crate::domain::kinds::TestContext)
            .unwrap_err()
    }

    #[test]
    fn a_valid_dag_passes() {
        let d = def(json!([
            {"id": "a", "kind": "echo", "input": {"x": "{{ input.x }}"}},
            {"id": "b", "kind": "echo", "depends_on": ["a"], "when": "steps.a.output.x > 1"},
            {"id": "c", "kind": "map", "depends_on": ["a"],
             "input": {"items": "{{ input.list }}", "step": {"kind": "echo", "input": {"v": "{{ item }}"}}}},
            {"id": "d", "kind": "approval", "depends_on": ["b", "c"]},
            {"id": "e", "kind": "wait", "input": {"duration": "1s"}, "depends_on": ["d"]},
        ]));
        d.validate(&crate::domain::kinds::TestContext).unwrap();
    }

    #[test]
    fn errors_name_the_step() {
        let e = err(json!([{"id": "a", "kind": "echo", "depends_on": ["zz"]}]));
        assert_eq!(e.field, "steps[0].depends_on");
        assert!(
            e.message.contains("`a`") && e.message.contains("`zz`"),
            "{e:?}"
        );

        let e = err(json!([
            {"id": "a", "kind": "echo", "depends_on": ["c"]},
            {"id": "b", "kind": "echo", "depends_on": ["a"]},
            {"id": "c", "kind": "echo", "depends_on": ["b"]},
        ]));
        assert!(e.message.contains("cycle"), "{e:?}");
        assert!(e.field.ends_with(".depends_on"));

        let e = err(json!([{"id": "a", "kind": "nope"}]));
        assert_eq!(e.field, "steps[0].kind");
        assert!(e.message.contains("unknown kind `nope`"));

        let e = err(json!([{"id": "a", "kind": "echo", "input": {"x": "{{ input. }}"}}]));
        assert_eq!(e.field, "steps[0].input");

        let e = err(json!([{"id": "a", "kind": "echo", "when": "1 +"}]));
        assert_eq!(e.field, "steps[0].when");

        let e = err(json!([{"id": "a", "kind": "sleep", "input": {"ms": "x"}}]));
        assert_eq!(e.field, "steps[0].input.ms");

        let e = err(json!([{"id": "a", "kind": "wait", "input": {}}]));
        assert_eq!(e.field, "steps[0].input");

        // A static input gets the same check as a job submitted on its own, installed
        // voices included.
        let e = err(json!([{"id": "a", "kind": "tts.render",
                            "input": {"text": "hi", "voice": "nope"}}]));
        assert_eq!(e.field, "steps[0].input.voice");
        let e = err(json!([{"id": "m", "kind": "map", "input": {"items": [1],
            "step": {"kind": "tts.render", "input": {"text": "hi", "voice": "nope"}}}}]));
        assert_eq!(e.field, "steps[0].input.step.input.voice");

        let e = err(json!([{"id": "a", "kind": "echo"}, {"id": "a", "kind": "echo"}]));
        assert_eq!(e.field, "steps[1].id");
    }

    #[test]
    fn templated_inputs_are_not_checked_statically() {
        def(json!([{"id": "a", "kind": "sleep", "input": {"ms": "{{ input.ms }}"}}]))
            .validate(&crate::domain::kinds::TestContext)
            .unwrap();
    }

    #[test]
    fn yaml_and_json_parse_the_same() {
        let y = "name: t\nsteps:\n  - id: a\n    kind: echo\n    input: {x: 1}\n";
        let j = br#"{"name":"t","steps":[{"id":"a","kind":"echo","input":{"x":1}}]}"#;
        assert_eq!(
            WorkflowDef::parse(y.as_bytes(), true).unwrap(),
            WorkflowDef::parse(j, false).unwrap()
        );
        let e = WorkflowDef::parse(br#"{"name":"t","steps":[{"id":"a"}]}"#, false).unwrap_err();
        assert!(e.field.starts_with("steps[0]"), "{e:?}");
    }

    #[test]
    fn input_schema_checks_run_input() {
        let d = WorkflowDef::from_value(json!({"name": "t",
            "input_schema": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
            "steps": [{"id": "a", "kind": "echo"}]}))
        .unwrap();
        d.validate(&crate::domain::kinds::TestContext).unwrap();
        check_input(&d, &json!({"n": 1})).unwrap();
        assert!(check_input(&d, &json!({})).is_err());
        let e = check_input(&d, &json!({"n": "x"})).unwrap_err();
        assert_eq!(e.field, "input.n");
    }
}
