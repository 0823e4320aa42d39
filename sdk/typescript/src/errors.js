// Errors: what the API answered (RFC 9457 problem JSON mapped to one class per status), what
// the network did, and the two errors a handler throws to steer retries.

/** Base class of every error the SDK throws about Capibara (not the handler's own errors). */
export class CapibaraError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The request never got an answer (connection refused or reset, DNS, request timeout). */
export class NetworkError extends CapibaraError {}

/** `client.wait()` gave up before the job ended; `.job` is the job as last seen. */
export class WaitTimeoutError extends CapibaraError {
  constructor(message, job) {
    super(message);
    this.job = job;
  }
}

/**
 * An error answer of the API. `type`, `title`, `detail` come from the problem JSON; `field` is
 * the first field it names (`input.width`, `Capibara-Lease`), `errors` all of them.
 */
export class ProblemError extends CapibaraError {
  constructor(problem, { status, headers } = {}) {
    const p = problem && typeof problem === "object" ? problem : {};
    const st = status ?? p.status ?? 0;
    const detail = p.detail ?? (typeof problem === "string" ? problem : "");
    const title = p.title ?? "";
    super(`${st}${title ? " " + title : ""}${detail ? ": " + detail : ""}`);
    this.status = st;
    this.type = p.type ?? "about:blank";
    this.title = title;
    this.detail = detail;
    this.errors = Array.isArray(p.errors) ? p.errors : [];
    this.field = this.errors[0]?.field ?? p.field ?? undefined;
    this.problem = p;
    this.headers = headers;
  }
}

/** 401: missing or unknown API key. */
export class UnauthorizedError extends ProblemError {}
/** 403: the key lacks the role. */
export class ForbiddenError extends ProblemError {}
/** 404: unknown id or route. */
export class NotFoundError extends ProblemError {}
/** 409: the action does not fit the resource's state. */
export class ConflictError extends ProblemError {}
/** 409 whose type ends in `lease-lost`: the lease token no longer names the job's attempt. */
export class LeaseLostError extends ConflictError {}
/** 400 or 422: a field is wrong (`.field` names it). */
export class ValidationError extends ProblemError {}
/** 429: a limit; `.retryAfter` is the `Retry-After` in seconds. */
export class RateLimitedError extends ProblemError {
  constructor(problem, opts = {}) {
    super(problem, opts);
    this.retryAfter = retryAfterSeconds(opts.headers);
  }
}
/** 503: Postgres or Redis unreachable; `.retryAfter` in seconds. */
export class UnavailableError extends ProblemError {
  constructor(problem, opts = {}) {
    super(problem, opts);
    this.retryAfter = retryAfterSeconds(opts.headers);
  }
}

/** Seconds from a `Retry-After` header (delta-seconds or an HTTP date); undefined if none. */
export function retryAfterSeconds(headers) {
  const v = headers?.get?.("retry-after");
  if (v == null || v === "") return undefined;
  const n = Number(v);
  if (Number.isFinite(n)) return Math.max(0, n);
  const t = Date.parse(v);
  return Number.isNaN(t) ? undefined : Math.max(0, (t - Date.now()) / 1000);
}

/**
 * The error for an API answer: `status`, the parsed body (problem JSON, or text), the headers.
 * @returns {ProblemError}
 */
export function errorFromResponse(status, body, headers) {
  const problem =
    body && typeof body === "object"
      ? body
      : { status, title: "", detail: typeof body === "string" ? body.slice(0, 1000) : "" };
  const opts = { status, headers };
  const type = typeof problem.type === "string" ? problem.type : "";
  switch (status) {
    case 400:
    case 422:
      return new ValidationError(problem, opts);
    case 401:
      return new UnauthorizedError(problem, opts);
    case 403:
      return new ForbiddenError(problem, opts);
    case 404:
      return new NotFoundError(problem, opts);
    case 409:
      return type.endsWith("lease-lost")
        ? new LeaseLostError(problem, opts)
        : new ConflictError(problem, opts);
    case 429:
      return new RateLimitedError(problem, opts);
    case 503:
      return new UnavailableError(problem, opts);
    default:
      return new ProblemError(problem, opts);
  }
}

// ---- why a job's AbortSignal was aborted (`job.signal.reason`) ----

/** The job's cancel was requested (seen in a heartbeat). */
export class CanceledError extends CapibaraError {}
/** The attempt ran past its `timeout_s`. */
export class JobTimeoutError extends CapibaraError {}
/** The worker is shutting down and gave the job back (released) after its grace period. */
export class ShutdownError extends CapibaraError {}

// ---- errors a handler throws ----

/** Throw from a handler to fail the job without retry; `type` is the recorded error type. */
export class FatalError extends Error {
  constructor(message, { type } = {}) {
    super(message);
    this.name = "FatalError";
    this.type = type ?? "fatal";
  }
}

/** Throw from a handler to retry the job after `seconds` (counts as a failed attempt). */
export class RetryAfterError extends Error {
  constructor(seconds, message, { type } = {}) {
    super(message ?? `retry after ${seconds} s`);
    this.name = "RetryAfterError";
    this.seconds = seconds;
    this.type = type ?? "retry_after";
  }
}
