"""schemathesis hooks for tests/tests/e2e/openapi_fuzz.rs (docs/testing.md).

The OpenAPI document states every rule a JSON Schema can state (api/src/openapi/strict.rs), and
schemathesis checks that the server accepts every body the document allows. A few rules are not
JSON Schema: they compare two fields, depend on this deployment, or are a language of their own.
These hooks fix up generated bodies for those rules only, so that every other field is still
drawn from the schema and must be accepted. Each rule is also documented on its field.

- `callback_url` needs CAPIBARA_WEBHOOK_SECRET (the test server has none) and a host that
  resolves to a public address: dropped, with `callback_events`.
- A subscription's `url` must resolve to a public address: a fixed public IP literal; its
  `headers` may not name the headers Capibara sets (listed in the field's description).
- A connector's `config.url` and `config.endpoint` (POST/PUT /v1/connectors, and a
  `connector.fetch` job's inline config) must resolve to a public address: a fixed public IP
  literal; its CSS selectors
  (`x-css-selector`, `lists`) and its `glob` are languages of their own: a valid selector,
  a valid glob.
- An `imap` connector's `config.host` (and any inline `host`): 127.0.0.1, which the fuzzed
  server's worker refuses (loopback, no `CAPIBARA_OUTBOUND_ALLOW_PRIVATE`): nothing leaves.
- `mail.send`: addresses (`from`, `to`, `cc`, `bcc`, `reply_to`) are a syntax of their own
  (RFC 5322 mailboxes): valid ones; `text` or `html` must be present; `smtp.username` and
  `smtp.password_secret` come together; `smtp.host` is 127.0.0.1 (refused by the worker, as
  above).
- A seed endpoint's `connector_id` (POST /v1/content/connectors/{family}) must name a
  connector of that family, which is this deployment's state: an inline connector of the
  family instead.
- An `http.request` job's (and `POST /v1/http/request`'s, `/stream-download`'s) `url` is `http://127.0.0.1:9/` (nothing leaves the machine; the
  outbound guard refuses loopback addresses there), with `auth` its headers hold no
  `Authorization`, and without `response: artifact` it names no artifact and reads at most
  10 MiB (JSON Schema's if/else says so, but the fuzzer draws both branches' fields).
- An `mcp.call` job's `server` is `http://127.0.0.1:9/mcp` (refused by the worker, as above).
- A job's `expires_at` is after now and after its `run_at`, and not given with `ttl_s`: a fixed
  far-future time (dropped with `run_at`, and in schedule and trigger targets, which refuse it).
- A batch's jobs carry no `dedup` (refused in a batch: it answers with an existing job).
- `debounce` goes with neither `run_at` nor `dedup` (it sets the job's due time; it merges
  where dedup returns): dropped when either is present, and from a batch's jobs (refused in a
  batch). A key merges only jobs of the kind pending under it (this deployment's state): the
  key is prefixed with the kind.
- `POST /v1/jobs/bulk`: each `filter.tag` is `key:value` (a tag without a colon gets one), and
  an empty filter needs `all: true` (a guard against a mass cancel that compares two fields).
  A bulk cancel would also end the jobs other operations wait for (`POST /v1/code/validate`
  answers 500 for a canceled check): the filter always holds the tag `fuzz:bulk`, which no
  other job carries (so it is never empty either).
- `POST /v1/orchestrate`: the intent is a built-in kind, so mode `flow` (a workflow) becomes
  `agent`; `mcp` goes only with modes `mcp` and `auto` (mode `mcp` needs it), its `server` is
  `http://127.0.0.1:9/mcp` (as above) and its `headers` are dropped (names are checked as
  `http.request`'s).
- An LLM provider's `base_url` (PUT /v1/llm/providers/{name}) must resolve to a public
  address: a fixed public IP literal; `check=true` on GET /v1/llm/providers would probe it
  (a call out of the machine): dropped.
- A limit (PUT /v1/limits/{name}) needs `max_running` or `rate` (or both): `max_running: 1`
  when the fuzzer drew neither; its `match.namespace` may only name the caller's own
  namespace: dropped.
- A `text.chunk` input's `overlap` is less than half of its `max_tokens` (also the body of
  `POST /v1/semantic/chunk`).
- `backoff.initial_ms` must not exceed `max_ms`; a schedule's `end_at` comes after `start_at` (a PATCH's `start_at` goes only with a later `end_at`, and its `end_at`
  only with an earlier `start_at`: the stored ones are unknown here);
  a backfill's `to` is not before `from`.
- `cron` is a crontab expression (docs/scheduler.md) and `timezone` an IANA name (about 600,
  too many for an enum that the coverage phase walks): drawn from valid ones.
- Targets and intents that name a workflow must name an existing one: a job target / a kind.
- Templates (trigger inputs, workflow step inputs, conditions, outputs) are minijinja, and a
  workflow's `depends_on` must name earlier steps without cycles: braces are taken out of
  generated strings, steps depend only on earlier steps, `when`/`output`/`input_schema` dropped.
- A backfill holds at most 1,000 ticks of the schedule's cron: `to` is at most 900 s after `from`.
- `after` and `Last-Event-ID` on GET /v1/events must be an event id of this log (not past its
  end): dropped.
- An `Idempotency-Key` names one request (reused with another body it is a 422): dropped.
- A kind's `input_schema`/`output_schema` is a JSON Schema (a language of its own, compiled at
  PUT): dropped from kind definitions (PUT /v1/kinds/{name}, POST /v1/workers). So are `mode`
  and `push`: a push kind needs CAPIBARA_WEBHOOK_SECRET (the test server has none) and a URL
  that resolves to a public address, like `callback_url`.
- A lease call holds up to `wait_ms` (30 s, the client's own timeout): at most 100 ms here.
- JSON Schema counts `146.0` as an integer; the API's integer fields take integers without a
  fraction (docs/api.md): integral floats are written as integers.
- A `text.embed` job's `texts` are cut to two short ones: the model's work is not what the
  fuzz test measures, and 256 long texts would take the CI machine's cores from the others.
  So are a `model.classify` job's.
- A `finetune.train` (or `finetune.command`) job's examples need two labels with two examples each (not a rule JSON
  Schema states): four fixed examples of two labels, at most 2 epochs (the training is not what
  the fuzz test measures); `examples_url`, `examples_artifact` and `resume_from` name this
  deployment's state (a reachable file, another job): dropped. The same four rows are
  `POST /v1/fine-tuning/start`'s `training_data`; `/v1/semantic/embed` and `/search` bodies are
  cut like `text.embed` inputs.

The hooks are `map_case` hooks, which schemathesis applies in every phase (coverage included).
"""

from datetime import datetime, timedelta

import schemathesis

CRONS = ["* * * * *", "*/5 * * * *", "0 9 * * 1-5", "0 0 1 * *", "30 4 * * 0,7",
         "@hourly", "@daily", "0 */2 * * * *", "15 10 * jan-jun mon-fri"]

RESERVED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
            "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
            "content-length", "content-type", "content-encoding", "expect"}

KINDS = ["echo", "sleep", "fail", "code.run", "code.validate", "tts.render"]


def _op(context):
    op = context.operation
    return f"{op.method.upper()} {op.path}"


PUBLIC_FEED = "https://93.184.215.14/feed.xml"
PUBLIC_ENDPOINT = "https://93.184.215.14"
# An inline connector of each seed family.
SEED_INLINE = {
    "web": {"type": "rss", "config": {"url": PUBLIC_FEED}},
    "api": {"type": "api", "config": {"url": PUBLIC_FEED}},
    "filesystem": {"type": "files", "config": {"path": "inbox"}},
    "communication": {"type": "imap", "config": {"host": "127.0.0.1", "port": 993, "tls": "tls",
                                                 "username": "u"}},
}


def _connector_config(body):
    if isinstance(body, dict) and isinstance(body.get("config"), dict):
        config = body["config"]
        if "url" in config:
            config["url"] = PUBLIC_FEED
        if "host" in config:
            config["host"] = "127.0.0.1"
        if "endpoint" in config:
            config["endpoint"] = PUBLIC_ENDPOINT
        # Globs (`files`, `s3`) are a language of their own: a valid one.
        if "glob" in config:
            config["glob"] = "**/*.md"
        # CSS selectors (`x-css-selector`) are a language of their own: a valid one.
        for k in ("item", "title", "link", "content"):
            if k in config:
                config[k] = "p"
        if isinstance(config.get("lists"), dict):
            config["lists"] = {k: "li" for k in config["lists"]}


def _job(job):
    if not isinstance(job, dict):
        return job
    if job.get("kind") == "connector.fetch":
        _connector_config(job.get("input"))
    if job.get("kind") == "mail.send":
        _mail_send(job.get("input"))
    if job.get("kind") in ("text.embed", "model.classify"):
        _text_embed(job.get("input"))
    if job.get("kind") in ("finetune.train", "finetune.command"):
        _finetune(job.get("input"))
    if job.get("kind") == "text.chunk":
        _chunk(job.get("input"))
    if job.get("kind") == "http.request":
        _http_request(job.get("input"))
    if job.get("kind") == "mcp.call" and isinstance(job.get("input"), dict):
        # No call leaves the machine: a loopback URL, which the outbound guard refuses.
        job["input"]["server"] = "http://127.0.0.1:9/mcp"
    job.pop("callback_url", None)
    job.pop("callback_events", None)
    _backoff(job.get("backoff"))
    # `debounce` sets the due time and merges: not with `run_at` or `dedup`; a key merges only
    # jobs of one kind (what is pending under it is this deployment's state).
    if job.get("debounce") is not None:
        if job.get("run_at") is not None or job.get("dedup") is not None:
            job.pop("debounce")
        elif isinstance(job["debounce"], dict) and isinstance(job["debounce"].get("key"), str):
            key = job["debounce"]["key"]
            job["debounce"]["key"] = f"{job.get('kind')}/{key}"[:256]
    # `expires_at` is after now and after `run_at`, and not with `ttl_s`.
    if job.get("expires_at") is not None:
        job.pop("ttl_s", None)
        if job.get("run_at") is not None:
            job.pop("expires_at")
        else:
            job["expires_at"] = "2999-01-01T00:00:00Z"
    return job


def _http_request(call, download=False):
    if not isinstance(call, dict):
        return
    # No call leaves the machine: a loopback URL, which the outbound guard refuses.
    call["url"] = "http://127.0.0.1:9/"
    # A body bigger than 10 MiB or a named artifact only with `response: artifact`.
    if not download and call.get("response") != "artifact":
        call.pop("artifact_name", None)
        most = call.get("max_response_bytes")
        if isinstance(most, int) and most > 10485760:
            call["max_response_bytes"] = 10485760
    # `auth` sets Authorization: not both (two fields compared).
    headers = call.get("headers")
    if call.get("auth") is not None and isinstance(headers, dict):
        for name in [n for n in headers if n.lower() == "authorization"]:
            headers.pop(name)


def _text_embed(embed):
    # Any texts are valid; the fuzz test does not measure the model, whose work on 256 long
    # texts would take the CI machine's cores from the tests that run beside it.
    if isinstance(embed, dict) and isinstance(embed.get("texts"), list):
        embed["texts"] = [t[:64] for t in embed["texts"][:2] if isinstance(t, str)] or ["x"]


def _chunk(chunk):
    # A window's overlap is less than half of `max_tokens` (two fields compared).
    if isinstance(chunk, dict):
        most = chunk.get("max_tokens")
        most = 128 if not isinstance(most, int) else most
        if isinstance(chunk.get("overlap"), int) and chunk["overlap"] * 2 >= most:
            chunk["overlap"] = 0


def _finetune(train):
    # Two labels with two examples each; a short training; no sources naming other state.
    if not isinstance(train, dict):
        return
    for k in ("examples_url", "examples_artifact", "resume_from"):
        train.pop(k, None)
    train["examples"] = [{"text": t, "label": l} for t, l in
                         (("good", "pos"), ("fine", "pos"), ("bad", "neg"), ("awful", "neg"))]
    if isinstance(train.get("epochs"), int):
        train["epochs"] = min(train["epochs"], 2)
    return train["examples"]


def _mail_send(mail):
    if not isinstance(mail, dict):
        return
    if "from" in mail:
        mail["from"] = "Capibara <bot@capibara.test>"
    if mail.get("reply_to") is not None:
        mail["reply_to"] = "team@capibara.test"
    for field in ("to", "cc", "bcc"):
        if isinstance(mail.get(field), list):
            mail[field] = [f"r{i}@example.org" for i in range(len(mail[field]))]
    # At most 100 recipients in all.
    room = 100 - len(mail.get("to") or [])
    for field in ("cc", "bcc"):
        if isinstance(mail.get(field), list):
            mail[field] = mail[field][:max(room, 0)]
            room -= len(mail[field])
    if mail.get("text") is None and mail.get("html") is None:
        mail["text"] = "t"
    smtp = mail.get("smtp")
    if isinstance(smtp, dict):
        smtp["host"] = "127.0.0.1"
        if (smtp.get("username") is None) != (smtp.get("password_secret") is None):
            smtp.pop("username", None)
            smtp.pop("password_secret", None)


def _backoff(backoff):
    if isinstance(backoff, dict):
        most = backoff.get("max_ms")
        most = 3_600_000 if most is None else most
        first = backoff.get("initial_ms")
        first = 1_000 if first is None else first
        if isinstance(first, int) and isinstance(most, int) and first > most:
            backoff["initial_ms"] = most


def _target(target):
    if isinstance(target, dict):
        if target.get("type") == "workflow":
            return {"type": "job", "job": {"kind": "echo"}}
        _job(target.get("job"))
        if isinstance(target.get("job"), dict):
            # A schedule or trigger fires many times: `ttl_s`, never a fixed `expires_at`.
            target["job"].pop("expires_at", None)
    return target


def _no_templates(v):
    if isinstance(v, str):
        return v.replace("{", "(").replace("}", ")")
    if isinstance(v, list):
        return [_no_templates(x) for x in v]
    if isinstance(v, dict):
        return {_no_templates(k): _no_templates(x) for k, x in v.items()}
    return v


def _integers(v):
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        return int(v)
    if isinstance(v, list):
        return [_integers(x) for x in v]
    if isinstance(v, dict):
        return {k: _integers(x) for k, x in v.items()}
    return v


def _time(s):
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except (TypeError, ValueError, AttributeError):
        return None


TIMEZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]


def _schedule(body, patch=False):
    if body.get("timezone") is not None:
        body["timezone"] = TIMEZONES[len(str(body["timezone"])) % len(TIMEZONES)]
    if "cron" in body:
        body["cron"] = CRONS[len(str(body["cron"])) % len(CRONS)]
    if "target" in body:
        body["target"] = _target(body["target"])
    start, end = _time(body.get("start_at")), _time(body.get("end_at"))
    if start and end and end <= start:
        body.pop("end_at")
    elif patch and start and not end:
        # The schedule's stored end_at (unknown here) may come before this start_at.
        body.pop("start_at")
    elif patch and end and not start:
        # The schedule's stored start_at (unknown here) may come after this end_at.
        body.pop("end_at")


@schemathesis.hook
def map_case(context, case):
    op = _op(context)
    if op == "GET /v1/events" and isinstance(case.query, dict):
        case.query.pop("after", None)
    if op.startswith("GET /v1/llm/providers") and isinstance(case.query, dict):
        case.query.pop("check", None)
    if case.headers:
        # A key names one request: a generated key reused with another body is a 422.
        case.headers.pop("Idempotency-Key", None)
        if op == "GET /v1/events":
            case.headers.pop("Last-Event-ID", None)
    body = case.body
    if isinstance(body, (dict, list)):
        body = _integers(body)
    if isinstance(body, dict):
        _body(op, body)
    case.body = body
    return case


def _kind_def(d):
    if isinstance(d, dict):
        for k in ("input_schema", "output_schema", "mode", "push"):
            d.pop(k, None)


def _body(op, body):
    if op == "PUT /v1/kinds/{name}":
        _kind_def(body)
    elif op == "POST /v1/workers":
        for k in body.get("kinds") or []:
            _kind_def(k)
    elif op == "POST /v1/workers/{id}/lease":
        wait = body.get("wait_ms")
        body["wait_ms"] = min(wait, 100) if isinstance(wait, int) else 100
    elif op == "POST /v1/jobs":
        _job(body)
    elif op in ("POST /v1/semantic/embed", "POST /v1/semantic/search"):
        _text_embed(body)
    elif op == "PUT /v1/llm/providers/{name}":
        body["base_url"] = "https://93.184.215.14/v1"
    elif op == "PUT /v1/limits/{name}":
        if body.get("max_running") is None and body.get("rate") is None:
            body["max_running"] = 1
        if isinstance(body.get("match"), dict):
            body["match"].pop("namespace", None)
    elif op == "POST /v1/http/request":
        _http_request(body)
    elif op == "POST /v1/http/stream-download":
        _http_request(body, download=True)
    elif op == "POST /v1/semantic/chunk":
        _chunk(body)
    elif op == "POST /v1/fine-tuning/start":
        rows = _finetune({"examples": []})
        body["training_data"] = [{"input": e["text"], "output": e["label"]} for e in rows]
        config = body.get("fine_tuning_config")
        if isinstance(config, dict) and isinstance(config.get("epochs"), int):
            config["epochs"] = min(config["epochs"], 2)
    elif op == "POST /v1/jobs/batch":
        for job in body.get("jobs") or []:
            _job(job)
            if isinstance(job, dict):
                # A batch is all new jobs: `dedup` and `debounce` are refused there (submit one
                # at a time).
                job.pop("dedup", None)
                job.pop("debounce", None)
    elif op == "POST /v1/jobs/bulk":
        f = body.get("filter")
        if not isinstance(f, dict):
            f = body["filter"] = {}
        tags = [t if not isinstance(t, str) or ":" in t else f"{t}:v"
                for t in f.get("tag") or []]
        f["tag"] = tags + ["fuzz:bulk"]
    elif op in ("POST /v1/schedules", "PATCH /v1/schedules/{id}"):
        _schedule(body, patch=op.startswith("PATCH"))
    elif op == "POST /v1/schedules/{id}/backfill":
        start, end = _time(body.get("from")), _time(body.get("to"))
        if start and end:
            start, end = min(start, end), max(start, end)
            end = min(end, start + timedelta(seconds=900))
            body["from"], body["to"] = start.isoformat(), end.isoformat()
    elif op in ("POST /v1/connectors", "PUT /v1/connectors/{id}"):
        _connector_config(body)
    elif op.startswith("POST /v1/content/connectors/"):
        family = op.rsplit("/", 1)[1]
        if "connector_id" in body and family in SEED_INLINE:
            # Which connector an id names is this deployment's state: an inline one instead.
            body.pop("connector_id")
            body.update(SEED_INLINE[family])
        _connector_config(body)
    elif op == "POST /v1/content/discover":
        for source in body.get("sources") or []:
            _connector_config(source)
    elif op == "POST /v1/subscriptions":
        body["url"] = "https://93.184.215.14/hooks/capibara"
        if isinstance(body.get("headers"), dict):
            body["headers"] = {k: v for k, v in body["headers"].items()
                               if k.lower() not in RESERVED and not k.lower().startswith("webhook-")}
    elif op == "POST /v1/orchestrate":
        if body.get("intent") not in KINDS:
            body["intent"] = "echo"
        body.pop("callback_url", None)
        # The intent is a kind: modes that need a workflow or a server are set up to match.
        if body.get("mode") == "flow":
            body["mode"] = "agent"
        if body.get("mode") in ("agent", "sync", "async") or body.get("mode") is None:
            body.pop("mcp", None)
        elif body.get("mode") == "mcp" and not isinstance(body.get("mcp"), dict):
            body["mcp"] = {}
        if isinstance(body.get("mcp"), dict):
            body["mcp"]["server"] = "http://127.0.0.1:9/mcp"
            body["mcp"].pop("headers", None)
    elif op == "POST /v1/workflows/{id}/runs":
        body.pop("callback_url", None)
    elif op == "POST /v1/triggers":
        body["target"] = _target(body.get("target"))
        if "input" in body:
            body["input"] = _no_templates(body["input"])
    elif op in ("POST /v1/workflows", "PUT /v1/workflows/{id}"):
        steps = body.get("steps") or []
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                continue
            step["id"] = f"s{i}"
            step["kind"] = "echo"
            earlier = {f"s{j}" for j in range(i)}
            deps = [d for d in step.get("depends_on") or [] if isinstance(d, str) and d in earlier]
            step["depends_on"] = sorted(set(deps))
            step.pop("when", None)
            if isinstance(step.get("retry"), dict):
                _backoff(step["retry"].get("backoff"))
            if "input" in step:
                step["input"] = _no_templates(step["input"])
        for k in ("output", "input_schema"):
            body.pop(k, None)
