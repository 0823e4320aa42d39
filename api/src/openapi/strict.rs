//! The rules of the document that the handlers' derived schemas cannot state by themselves, so
//! that a client (or a fuzzer) that follows the document sends what the server accepts:
//! each field's ranges, patterns and enums as the handlers check them, and a job's `input`
//! described by its kind's own schema (`kinds::KindSpec::input_schema`), one variant per kind.
//! `tests/tests/e2e/openapi_fuzz.rs` checks that every input the document allows is accepted.
//!
//! What JSON Schema cannot state stays in the prose of each field (a cron expression's meaning,
//! a template's syntax, that `to` is not before `from`, that a URL's host resolves).

use capibara_shared::domain::{
    auth::Role,
    delivery::{EVENT_ALIASES, JOB_EVENT_NAMES, RUN_EVENT_NAMES},
    kinds::{self, KindContext},
};
use serde_json::{json, Map, Value};
use utoipa::openapi::OpenApi;

/// Names: not only whitespace, at most `max` characters.
fn name(max: usize) -> Value {
    json!({"minLength": 1, "maxLength": max, "pattern": "\\S"})
}

const QUEUE_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";

/// A user kind's name (docs/workers.md): lowercase dotted segments, never a built-in kind or in
/// a built-in family.
fn user_kind_name() -> Value {
    let families: Vec<String> = kinds::user::RESERVED_PREFIXES
        .iter()
        .map(|p| regex_escape(p.trim_end_matches('.')))
        .collect();
    let builtins: Vec<&str> = kinds::KINDS.iter().map(|k| k.name).collect();
    json!({"type": "string", "maxLength": kinds::user::MAX_NAME,
        "pattern": "^[a-z][a-z0-9_-]*(\\.[a-z0-9_-]+)*$",
        "not": {"anyOf": [{"enum": builtins},
                          {"pattern": format!("^({})\\.", families.join("|"))}]}})
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// `(JSON pointer, keywords merged into the schema there)`.
fn field_rules() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/components/schemas/KindDef/properties/description",
            json!({"maxLength": 1000}),
        ),
        (
            "/components/schemas/KindDef/properties/queue",
            json!({"pattern": QUEUE_PATTERN}),
        ),
        (
            "/components/schemas/RegisterWorker/properties/queues",
            json!({"minItems": 1, "maxItems": 100, "items": {"type": "string", "pattern": QUEUE_PATTERN}}),
        ),
        (
            "/components/schemas/RegisterWorker/properties/name",
            name(100),
        ),
        (
            "/components/schemas/RegisterWorker/properties/version",
            json!({"maxLength": 100}),
        ),
        (
            "/components/schemas/RegisterWorker/properties/labels",
            json!({"maxProperties": 32}),
        ),
        (
            "/components/schemas/LogReport/properties/lines",
            json!({"minItems": 1, "maxItems": 100}),
        ),
        (
            "/components/schemas/LogLine/properties/level",
            json!({"enum": ["debug", "info", "warn", "error"]}),
        ),
        (
            "/components/schemas/LogLine/properties/message",
            json!({"maxLength": 10_000}),
        ),
        (
            "/components/schemas/ProgressReport/properties/message",
            json!({"maxLength": 1000}),
        ),
        (
            "/components/schemas/ReportedError/properties/type",
            name(100),
        ),
        (
            "/components/schemas/ReportedError/properties/message",
            json!({"maxLength": 10_000}),
        ),
        (
            "/components/schemas/SubmitJob/properties/queue",
            json!({"pattern": QUEUE_PATTERN}),
        ),
        (
            "/components/schemas/SubmitJob/properties/max_attempts",
            json!({"minimum": 1, "maximum": 100}),
        ),
        (
            "/components/schemas/SubmitJob/properties/timeout_s",
            json!({"minimum": 1, "maximum": 86_400}),
        ),
        (
            "/components/schemas/SubmitJob/properties/callback_events",
            json!({"minItems": 1, "items": {"enum": JOB_EVENT_NAMES}}),
        ),
        (
            "/components/schemas/SubmitJob/properties/tags",
            json!({
            "maxProperties": 32,
            "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": "^[^:]*$"},
            "additionalProperties": {"type": "string", "maxLength": 256}}),
        ),
        (
            "/components/schemas/Backoff/properties/factor",
            json!({"minimum": 1, "maximum": 10}),
        ),
        (
            "/components/schemas/Backoff/properties/max_ms",
            json!({"maximum": 7 * 24 * 3_600_000u64}),
        ),
        (
            "/components/schemas/SubmitBatch/properties/jobs",
            json!({"minItems": 1, "maxItems": crate::routes::jobs::MAX_BATCH}),
        ),
        (
            "/components/schemas/CreateSchedule/properties/name",
            name(200),
        ),
        (
            "/components/schemas/UpdateSchedule/properties/name",
            name(200),
        ),
        (
            "/components/schemas/CreateSchedule/properties/catch_up_window_s",
            json!({"minimum": 0, "maximum": 604_800}),
        ),
        (
            "/components/schemas/UpdateSchedule/properties/catch_up_window_s",
            json!({"minimum": 0, "maximum": 604_800}),
        ),
        (
            "/components/schemas/CreateSchedule/properties/jitter_s",
            json!({"minimum": 0, "maximum": 3_600}),
        ),
        (
            "/components/schemas/UpdateSchedule/properties/jitter_s",
            json!({"minimum": 0, "maximum": 3_600}),
        ),
        ("/components/schemas/CreateKey/properties/name", name(100)),
        (
            "/components/schemas/CreateKey/properties/roles",
            json!({"minItems": 1}),
        ),
        (
            "/components/schemas/CreateKey/properties/namespace",
            json!({"pattern": "^[a-z0-9_-]{1,63}$"}),
        ),
        (
            "/components/schemas/CreateKey",
            json!({
            "if": {"properties": {"super_admin": {"const": true}}, "required": ["super_admin"]},
            "then": {"properties": {"roles": {"contains": {"const": Role::Admin.as_str()}}}}}),
        ),
        (
            "/components/schemas/CreateTrigger/properties/name",
            name(200),
        ),
        (
            "/components/schemas/CreateTrigger/properties/rate_limit_per_minute",
            json!({"minimum": 1, "maximum": 100_000}),
        ),
        (
            "/components/schemas/TriggerAuth/oneOf/0/properties/token",
            json!({"minLength": 16}),
        ),
        (
            "/components/schemas/TriggerAuth/oneOf/1/properties/secret",
            json!({"pattern": "^whsec_(?:[A-Za-z0-9+/]{4}){8,}$", "description": "`whsec_` and the base64 of at least 24 random bytes (without padding); omit it to have one generated."}),
        ),
        (
            "/components/schemas/TriggerAuth/oneOf/2/properties/secret",
            json!({"minLength": 16}),
        ),
        (
            "/components/schemas/TriggerAuth/oneOf/2/properties/header",
            json!({"pattern": "^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$"}),
        ),
        (
            "/components/schemas/TriggerAuth/oneOf/2",
            json!({"required": ["type", "secret"]}),
        ),
        (
            "/components/schemas/CreateSubscription/properties/description",
            json!({"maxLength": 500}),
        ),
        (
            "/components/schemas/CreateSubscription/properties/headers",
            delivery_headers(),
        ),
        (
            "/components/schemas/TriggerAuth/oneOf/0",
            json!({"additionalProperties": false}),
        ),
        (
            "/components/schemas/TriggerAuth/oneOf/1",
            json!({"additionalProperties": false}),
        ),
        (
            "/components/schemas/TriggerAuth/oneOf/2",
            json!({"additionalProperties": false}),
        ),
        // Values: any JSON (an `echo` job's input may be a list).
        (
            "/components/schemas/Job/properties/input",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/Job/properties/output",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/Run/properties/input",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/Run/properties/output",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/StepState/properties/input",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/StepState/properties/output",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/ItemState/properties/output",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/OrchestrateResponse/properties/result",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/OrchestrateResponse/properties/context",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/CreateSubscription/properties/events",
            subscription_events(),
        ),
        (
            "/components/schemas/CreateSubscription/properties/event_types",
            subscription_events(),
        ),
        (
            "/components/schemas/CreateSubscription",
            json!({"oneOf": [
            {"required": ["events"], "not": {"required": ["event_types"]}},
            {"required": ["event_types"], "not": {"required": ["events"]}}]}),
        ),
        (
            "/components/schemas/TargetBody/oneOf/0",
            json!({"additionalProperties": false}),
        ),
        (
            "/components/schemas/TargetBody/oneOf/1",
            json!({"additionalProperties": false}),
        ),
        (
            "/components/schemas/TargetBody/oneOf/1/properties/workflow_id",
            json!({"format": "uuid",
            "description": "A workflow of the key's namespace."}),
        ),
        (
            "/components/schemas/CreateTrigger/properties/input",
            json!({"type": Value::Null,
            "description": "A template (any JSON; strings may hold minijinja over `body` and `headers`) of the job input or the run input."}),
        ),
        (
            "/components/schemas/Trigger/properties/input",
            json!({"type": Value::Null}),
        ),
        (
            "/components/schemas/StepDef/properties/id",
            json!({"pattern": "^[A-Za-z0-9_-]{1,64}$"}),
        ),
        (
            "/components/schemas/StepDef/properties/queue",
            json!({"pattern": QUEUE_PATTERN}),
        ),
        (
            "/components/schemas/StepDef/properties/timeout_s",
            json!({"minimum": 1, "maximum": 86_400}),
        ),
        (
            "/components/schemas/StepRetry/properties/max_attempts",
            json!({"minimum": 1, "maximum": 100}),
        ),
        (
            "/components/schemas/WorkflowDef/properties/steps",
            json!({"minItems": 1, "maxItems": capibara_shared::domain::workflow::MAX_STEPS}),
        ),
        (
            "/components/schemas/PutSecret/properties/value",
            json!({"maxLength": 16 * 1024,
            "description": "At most 64 KiB of UTF-8 (the schema says 16,384 characters: 4 bytes each at worst)."}),
        ),
        ("/components/schemas/WorkflowDef/properties/name", name(200)),
        (
            "/components/schemas/Orchestrate/properties/mode",
            json!({"enum": ["auto", "sync", "async", null]}),
        ),
        (
            "/components/schemas/ExecuteCode/properties/language",
            json!({"enum": [kinds::CODE_LANGUAGES[0], kinds::CODE_LANGUAGES[1], null]}),
        ),
        (
            "/components/schemas/ExecuteCode/properties/code",
            json!({"type": "string", "maxLength": kinds::CODE_MAX_BYTES}),
        ),
        (
            "/components/schemas/ExecuteCode/properties/timeout",
            json!({"exclusiveMinimum": 0, "maximum": kinds::CODE_MAX_TIMEOUT_MS / 1000}),
        ),
        (
            "/components/schemas/ExecuteCode/properties/memory_mb",
            json!({"minimum": kinds::CODE_MIN_MEMORY_MB, "maximum": kinds::CODE_MAX_MEMORY_MB}),
        ),
        (
            "/components/schemas/ExecuteCode/properties/context",
            json!({"type": ["object", "null"]}),
        ),
        (
            "/components/schemas/ExecuteCode",
            json!({"required": ["code"], "additionalProperties": false}),
        ),
        (
            "/components/schemas/ValidateCode/properties/language",
            json!({"enum": [kinds::CODE_LANGUAGES[0], kinds::CODE_LANGUAGES[1], null]}),
        ),
        (
            "/components/schemas/ValidateCode/properties/code",
            json!({"type": "string", "maxLength": kinds::CODE_MAX_BYTES}),
        ),
        (
            "/components/schemas/ValidateCode",
            json!({"required": ["code"], "additionalProperties": false}),
        ),
    ]
}

/// A subscription's custom headers (`subscription::validate_headers`): HTTP header names
/// (except the reserved ones, which the description names), values of visible ASCII without
/// surrounding spaces.
fn delivery_headers() -> Value {
    use capibara_shared::domain::subscription::{MAX_HEADERS, RESERVED_HEADERS};
    json!({
        "type": ["object", "null"],
        "maxProperties": MAX_HEADERS,
        "description": format!(
            "Sent with every delivery. Capibara sets, and refuses here: {} and `webhook-*`.",
            RESERVED_HEADERS.join(", ")),
        "propertyNames": {"pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"},
        "additionalProperties": {"type": "string", "pattern": "^(?:[!-~](?:[ \\t!-~]*[!-~])?)?$"},
    })
}

/// A subscription's event names: job and run events, the aliases and the wildcards.
fn subscription_events() -> Value {
    let names: Vec<&str> = JOB_EVENT_NAMES
        .iter()
        .chain(RUN_EVENT_NAMES)
        .copied()
        .chain(EVENT_ALIASES.iter().map(|(a, _)| *a))
        .chain(["job.*", "run.*", "*"])
        .collect();
    json!({"type": "array", "minItems": 1, "maxItems": 50, "items": {"enum": names}})
}

/// The document with the field rules, and each job body as a choice of one variant per kind.
pub fn apply(doc: OpenApi, ctx: &dyn KindContext) -> Value {
    let mut v = serde_json::to_value(&doc).expect("the document serializes");
    for (pointer, rules) in field_rules() {
        let at = v
            .pointer_mut(pointer)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("the document has no schema at {pointer}"));
        // A `null` keyword removes it.
        for (k, rule) in rules.as_object().expect("an object") {
            if rule.is_null() {
                at.remove(k);
            } else {
                at.insert(k.clone(), rule.clone());
            }
        }
    }
    // Pages list the items by reference, so that the items' rules above hold in lists too.
    for (page, item) in [("Page_Job", "Job"), ("Page_Run", "Run")] {
        if let Some(items) = v.pointer_mut(&format!(
            "/components/schemas/{page}/properties/items/items"
        )) {
            *items = json!({"$ref": format!("#/components/schemas/{item}")});
        }
    }
    // `push` goes with `"mode": "push"`, and only with it.
    if let Some(def) = v.pointer_mut("/components/schemas/KindDef") {
        def["if"] = json!({"properties": {"mode": {"const": "push"}}, "required": ["mode"]});
        def["then"] = json!({"required": ["push"], "properties": {"push": {"type": "object"}}});
        def["else"] = json!({"properties": {"push": {"type": "null"}}});
    }
    // A connector's config is its type's; one variant per type.
    use capibara_shared::domain::connector::types::ApiAuth;
    if let Some(def) = v.pointer("/components/schemas/ConnectorDef").cloned() {
        let variants: Vec<Value> = capibara_shared::domain::connector::types::TYPES
            .iter()
            .map(|t| {
                let mut d = def.clone();
                d["title"] = json!(format!("a `{}` connector", t.name));
                d["description"] = json!(t.description);
                d["properties"]["type"] = json!({"const": t.name});
                d["properties"]["config"] = (t.schema)();
                d["properties"]["name"] = json!({"type": "string", "minLength": 1,
                    "maxLength": capibara_shared::domain::connector::MAX_NAME, "pattern": "\\S"});
                if matches!(t.name, "api" | "graphql") {
                    // The `auth` method's credential is a required secret.
                    d["allOf"] = ApiAuth::SECRETS
                        .iter()
                        .map(|(method, place)| json!({
                            "if": {"properties": {"config": {"properties": {"auth": {
                                "properties": {"type": {"const": method}}, "required": ["type"]}},
                                "required": ["auth"]}}, "required": ["config"]},
                            "then": {"properties": {"secrets": {"required": [place]}},
                                     "required": ["secrets"]}}))
                        .collect();
                }
                d["properties"]["secrets"] = if t.secret_pattern.is_empty() {
                    json!({"type": "object", "maxProperties": 0})
                } else {
                    json!({"type": "object",
                    "propertyNames": {"pattern": t.secret_pattern},
                    "additionalProperties": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}})
                };
                if let Some(place) = (t.needs_secrets)(&json!({})) {
                    // A credential the type always needs (an `imap` password) is a required secret.
                    d["properties"]["secrets"]["required"] = json!([place]);
                    let mut required = d["required"].as_array().cloned().unwrap_or_default();
                    required.push(json!("secrets"));
                    d["required"] = Value::Array(required);
                }
                d
            })
            .collect();
        v["components"]["schemas"]["ConnectorDef"] = json!({
            "description": def.get("description").cloned().unwrap_or(Value::Null),
            "oneOf": variants});
    }
    // The seed endpoints take a `connector.fetch` input of their family's types; discover's
    // sources are inline connectors of any type.
    for (family, names) in capibara_shared::domain::connector::types::FAMILIES {
        let at = format!(
            "/paths/~1v1~1content~1connectors~1{family}/post/requestBody/content/application~1json/schema"
        );
        if let Some(schema) = v.pointer_mut(&at) {
            *schema = capibara_shared::domain::connector::types::fetch_schema_of(names);
        }
    }
    if let Some(items) = v.pointer_mut("/components/schemas/Discover/properties/sources/items") {
        let variants: Vec<Value> = capibara_shared::domain::connector::types::TYPES
            .iter()
            .map(|t| {
                json!({"type": "object", "title": t.name, "required": ["type", "config"],
                       "additionalProperties": false,
                       "properties": {"type": {"const": t.name}, "config": (t.schema)()}})
            })
            .collect();
        *items = json!({"oneOf": variants});
    }
    // A worker declares kinds by name or with their definition.
    if let Some(def) = v.pointer("/components/schemas/KindDef").cloned() {
        let mut declared = def;
        declared["properties"]["name"] = user_kind_name();
        declared["required"] = json!(["name"]);
        declared["description"] =
            json!("A kind with its definition (registered or updated first).");
        v["components"]["schemas"]["RegisterWorker"]["properties"]["kinds"] = json!({
            "type": "array", "minItems": 1, "maxItems": 100,
            "description": "Kinds this worker runs: names (registered with the defaults when new), or kinds with their definition.",
            "items": {"oneOf": [user_kind_name(), declared]}});
    }
    set_parameter(&mut v, "/v1/kinds/{name}", "put", "name", user_kind_name());
    for_each_parameter(
        &mut v,
        "Capibara-Lease",
        json!({"type": "string", "pattern": "^[0-9a-f]{32}\\.[0-9]{1,9}\\.[0-9a-f]{32}$",
               "description": "The lease token the lease call answered."}),
    );
    let public: Vec<&str> = kinds::names();
    set_parameter(&mut v, "/v1/events", "get", "kind", json!({"enum": public}));
    for_each_parameter(
        &mut v,
        "Last-Event-ID",
        json!({"type": "integer", "minimum": 0, "maximum": i64::MAX}),
    );
    // Trimmed of spaces and quotes, then 1-255 characters of printable ASCII.
    for_each_parameter(
        &mut v,
        "Idempotency-Key",
        json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!#-~]([ -~]*[!#-~])?$"}),
    );
    for method in ["put", "delete"] {
        set_parameter(
            &mut v,
            "/v1/secrets/{name}",
            method,
            "name",
            json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}),
        );
    }
    // The seed's query-string form of /v1/code/validate is documented in docs/code.md; the
    // document describes the JSON body (one form per request: both is a 400).
    if let Some(op) = v.pointer_mut("/paths/~1v1~1code~1validate/post") {
        if let Some(o) = op.as_object_mut() {
            o.remove("parameters");
        }
        op["requestBody"]["required"] = json!(true);
    }
    // POST /v1/tts takes a `tts.render` input as its body.
    if let (Some(tts), Some(body)) = (
        kinds::find_public("tts.render"),
        v.pointer_mut("/paths/~1v1~1tts/post/requestBody/content/application~1json"),
    ) {
        body["schema"] = tts.input_schema(ctx);
    }
    // The semantic seed endpoints take their kind's input as their body.
    for (path, kind) in [
        ("semantic~1embed", "text.embed"),
        ("semantic~1search", "memory.search"),
        ("semantic~1chunk", "text.chunk"),
    ] {
        if let (Some(k), Some(body)) = (
            kinds::find_public(kind),
            v.pointer_mut(&format!(
                "/paths/~1v1~1{path}/post/requestBody/content/application~1json"
            )),
        ) {
            body["schema"] = k.input_schema(ctx);
        }
    }
    // The http seed endpoints take an `http.request` input (a stream-download's without
    // `response`, which it sets).
    if let Some(k) = kinds::find_public("http.request") {
        for path in ["http~1request", "http~1stream-download"] {
            if let Some(body) = v.pointer_mut(&format!(
                "/paths/~1v1~1{path}/post/requestBody/content/application~1json"
            )) {
                let mut schema = k.input_schema(ctx);
                if path == "http~1stream-download" {
                    if let Some(p) = schema["properties"].as_object_mut() {
                        p.remove("response");
                    }
                    // Always an artifact: the limits of that branch.
                    if let Some(o) = schema.as_object_mut() {
                        o.remove("if");
                        o.remove("else");
                    }
                }
                body["schema"] = schema;
            }
        }
    }
    if let Some(job) = v.pointer_mut("/components/schemas/SubmitJob") {
        *job = job_variants(job, ctx);
    }
    v
}

/// Replace the schema of every operation's parameter `name`.
fn for_each_parameter(v: &mut Value, name: &str, schema: Value) {
    let Some(paths) = v.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for op in paths.values_mut().filter_map(Value::as_object_mut) {
        for params in op
            .values_mut()
            .filter_map(|o| o.get_mut("parameters"))
            .filter_map(Value::as_array_mut)
        {
            for p in params.iter_mut().filter(|p| p["name"] == name) {
                p["schema"] = schema.clone();
            }
        }
    }
}

/// Replace the schema of the parameter `name` of an operation.
fn set_parameter(v: &mut Value, path: &str, method: &str, name: &str, schema: Value) {
    let pointer = format!("/paths/{}/{method}/parameters", path.replace('/', "~1"));
    let param = v
        .pointer_mut(&pointer)
        .and_then(Value::as_array_mut)
        .and_then(|ps| ps.iter_mut().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"));
    param["schema"] = schema;
}

/// `{oneOf: [...]}` of the job body, one variant per kind: `kind` a constant, `input` that kind's
/// schema (required when the kind's input has required fields, else also `null` or absent).
fn job_variants(job: &Value, ctx: &dyn KindContext) -> Value {
    let base: Map<String, Value> = job
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let variants: Vec<Value> = kinds::KINDS
        .iter()
        .filter(|k| !k.internal)
        .map(|k| {
            let mut properties = base.clone();
            properties.insert(
                "kind".into(),
                json!({"const": k.name, "description": k.description}),
            );
            let input = k.input_schema(ctx);
            let mut required = vec![json!("kind")];
            if k.input_required() {
                required.push(json!("input"));
                properties.insert("input".into(), input);
            } else {
                properties.insert(
                    "input".into(),
                    json!({"anyOf": [input, {"type": "null"}], "default": {}}),
                );
            }
            json!({
                "title": k.name,
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": false,
                "dependentSchemas": {"callback_events": {
                    "required": ["callback_url"],
                    "properties": {"callback_url": {"type": "string"}}}},
            })
        })
        .collect();
    let mut out = json!({"oneOf": variants});
    if let Some(d) = job.get("description") {
        out["description"] = d.clone();
    }
    out
}
