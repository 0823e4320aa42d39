// Type declarations of @capibara/sdk (hand-written; keep in sync with src/).

// ---------------------------------------------------------------- API shapes

export type JobStatus = "scheduled" | "queued" | "running" | "succeeded" | "failed" | "canceled";
export type Priority = "low" | "normal" | "high" | "critical";
export type RunStatus = "queued" | "running" | "waiting" | "succeeded" | "failed" | "canceled";

export interface JobError {
  type: string;
  message: string;
}

export interface Backoff {
  initial_ms?: number;
  factor?: number;
  max_ms?: number;
}

/** A job as the API returns it (`GET /v1/jobs/{id}`). */
export interface JobInfo<Input = any, Output = any> {
  id: string;
  namespace: string;
  kind: string;
  queue: string;
  priority: Priority;
  status: JobStatus;
  input: Input;
  output: Output | null;
  error: JobError | null;
  progress: { percent?: number; message?: string; data?: unknown } | null;
  tags: Record<string, string>;
  /** Attempts started so far. */
  attempt: number;
  max_attempts: number;
  timeout_s: number | null;
  backoff: Backoff | null;
  callback_url: string | null;
  callback_events: string[] | null;
  run_at: string | null;
  cancel_requested: boolean;
  worker_id: string | null;
  artifacts: unknown[];
  version: number;
  created_at: string;
  queued_at: string | null;
  started_at: string | null;
  finished_at: string | null;
  updated_at: string;
  run_id?: string;
  step_id?: string;
  [key: string]: unknown;
}

/** One event of a stream: `{id, stream_type, stream_id, version, type, data, metadata, recorded_at}`. */
export interface EventEnvelope<Data = any> {
  id: string;
  stream_type: string;
  stream_id: string;
  version: number;
  type: string;
  data: Data;
  metadata: Record<string, unknown>;
  recorded_at: string;
}

export interface Page<T> {
  items: T[];
  next_cursor: string | null;
}

/** A kind's definition (`PUT /v1/kinds/{name}`); every field optional. */
export interface KindSpec {
  description?: string;
  queue?: string;
  input_schema?: object;
  output_schema?: object;
  timeout_s?: number;
  max_attempts?: number;
  priority?: Priority;
  mode?: "pull";
}

export interface KindInfo {
  name: string;
  builtin: boolean;
  default_queue: string;
  description: string;
  input_schema: object;
  output_schema?: object | null;
  timeout_s?: number | null;
  max_attempts?: number | null;
  priority?: Priority | null;
  live_workers?: number | null;
  version?: number | null;
  updated_at?: string | null;
  [key: string]: unknown;
}

export interface Run {
  id: string;
  workflow_id: string;
  status: RunStatus;
  input: unknown;
  output: unknown;
  steps: unknown[];
  [key: string]: unknown;
}

export interface ScheduleSpec {
  name: string;
  cron: string;
  timezone?: string;
  target:
    | { type: "job"; job: { kind: string; input?: unknown; [field: string]: unknown } }
    | { type: "workflow"; workflow_id: string; input?: unknown };
  overlap?: "allow" | "skip" | "buffer_one";
  catch_up?: "none" | "latest" | "all";
  catch_up_window_s?: number;
  jitter_s?: number;
  start_at?: string;
  end_at?: string;
}

export interface Schedule extends ScheduleSpec {
  id: string;
  next_fire_times: string[];
  [key: string]: unknown;
}

/** `POST /v1/workers` body. */
export interface WorkerRegistrationSpec {
  kinds: Array<string | ({ name: string } & KindSpec)>;
  queues?: string[];
  concurrency?: number;
  name?: string;
  labels?: Record<string, string>;
  version?: string;
}

/** `POST /v1/workers` answer. */
export interface WorkerRegistration {
  id: string;
  name: string;
  kinds: string[];
  queues: string[];
  /** Visibility timeout: a lease not renewed within it expires. */
  lease_s: number;
  /** How often to renew each lease. */
  heartbeat_s: number;
}

// ---------------------------------------------------------------- errors

export class CapibaraError extends Error {}
/** The request never got an answer (connection refused or reset, timeout). */
export class NetworkError extends CapibaraError {}
/** `wait()` gave up; `.job` is the job (or run) as last seen. */
export class WaitTimeoutError extends CapibaraError {
  constructor(message: string, job: unknown);
  job: any;
}

export interface Problem {
  type?: string;
  title?: string;
  status?: number;
  detail?: string;
  errors?: Array<{ field: string; message: string }>;
  [member: string]: unknown;
}

/** An error answer (RFC 9457 problem JSON). */
export class ProblemError extends CapibaraError {
  constructor(problem: Problem | string, opts?: { status?: number; headers?: Headers });
  status: number;
  type: string;
  title: string;
  detail: string;
  /** The first field the problem names (`input.width`, `Capibara-Lease`). */
  field: string | undefined;
  errors: Array<{ field: string; message: string }>;
  problem: Problem;
  headers: Headers | undefined;
}
export class UnauthorizedError extends ProblemError {}
export class ForbiddenError extends ProblemError {}
export class NotFoundError extends ProblemError {}
export class ConflictError extends ProblemError {}
/** 409 `…lease-lost`: the token no longer names the job's attempt; nothing was recorded. */
export class LeaseLostError extends ConflictError {}
/** 400 or 422. */
export class ValidationError extends ProblemError {}
export class RateLimitedError extends ProblemError {
  /** Seconds, from `Retry-After`. */
  retryAfter: number | undefined;
}
export class UnavailableError extends ProblemError {
  retryAfter: number | undefined;
}
/** `job.signal.reason` when the job was canceled. */
export class CanceledError extends CapibaraError {}
/** `job.signal.reason` when the attempt ran past its `timeout_s`. */
export class JobTimeoutError extends CapibaraError {}
/** `job.signal.reason` when the worker released the job at shutdown. */
export class ShutdownError extends CapibaraError {}

/** Throw from a handler: fail the job without retry. */
export class FatalError extends Error {
  constructor(message: string, opts?: { type?: string });
  /** The recorded error type (default `fatal`). */
  type: string;
}
/** Throw from a handler: retry no sooner than `seconds`. */
export class RetryAfterError extends Error {
  constructor(seconds: number, message?: string, opts?: { type?: string });
  seconds: number;
  type: string;
}

/** The typed error of an API answer. */
export function errorFromResponse(status: number, body: unknown, headers?: Headers): ProblemError;

// ---------------------------------------------------------------- client

export interface ClientOptions {
  /** Default `CAPIBARA_URL`, else `http://127.0.0.1:8080`. */
  url?: string;
  /** Default `CAPIBARA_API_KEY`. */
  apiKey?: string;
  /** Retries of a failed idempotent call (default 3). */
  maxRetries?: number;
  /** Per request, on top of any server-side wait (default 30000). */
  timeoutMs?: number;
  fetch?: typeof fetch;
}

export interface CallOptions {
  signal?: AbortSignal;
}

export interface SubmitOptions extends CallOptions {
  queue?: string;
  priority?: Priority;
  /** RFC 3339; a future time makes the job `scheduled`. */
  runAt?: string;
  maxAttempts?: number;
  timeoutS?: number;
  backoff?: Backoff;
  tags?: Record<string, string>;
  callbackUrl?: string;
  callbackEvents?: string[];
  /** Replays return the same job; also makes the call safe to retry. */
  idempotencyKey?: string;
  /** `Prefer: wait=N` (≤ 60): answer the finished job if it ends in time. */
  waitS?: number;
  /** Other submission fields, passed as they are. */
  [field: string]: unknown;
}

export interface BatchItem extends Omit<SubmitOptions, "idempotencyKey" | "waitS" | "signal"> {
  kind: string;
  input?: unknown;
}

export interface StreamOptions extends CallOptions {
  /** Start after this event id (SSE `Last-Event-ID`). */
  lastEventId?: string;
  /** Reconnect after a network error (default true). */
  reconnect?: boolean;
  /** Failed reconnects in a row before giving up (default 10). */
  maxReconnects?: number;
}

export interface WaitOptions extends CallOptions {
  /** Default: no limit. */
  timeoutMs?: number;
}

export class Client {
  constructor(options?: ClientOptions);
  readonly url: string;

  submit<I = any, O = any>(kind: string, input?: I, options?: SubmitOptions): Promise<JobInfo<I, O>>;
  submitBatch(jobs: BatchItem[], options?: { idempotencyKey?: string } & CallOptions): Promise<JobInfo[]>;
  get(id: string, options?: { waitS?: number } & CallOptions): Promise<JobInfo>;
  wait(id: string, options?: WaitOptions): Promise<JobInfo>;
  listJobs(
    query?: { status?: JobStatus; kind?: string; queue?: string; tag?: string | string[]; limit?: number; cursor?: string },
    options?: CallOptions,
  ): Promise<Page<JobInfo>>;
  events(id: string, options?: { after?: string; limit?: number } & CallOptions): Promise<Page<EventEnvelope>>;
  allEvents(id: string, options?: CallOptions): Promise<EventEnvelope[]>;
  stream(id: string, options?: StreamOptions): AsyncGenerator<EventEnvelope, void, undefined>;
  streamAll(
    options?: { types?: string | string[]; streamType?: string; kind?: string; tag?: string | string[] } & StreamOptions,
  ): AsyncGenerator<EventEnvelope, void, undefined>;
  cancel(id: string, options?: CallOptions): Promise<JobInfo>;
  retry(id: string, options?: CallOptions): Promise<JobInfo>;

  putKind(name: string, spec?: KindSpec, options?: CallOptions): Promise<KindInfo>;
  getKind(name: string, options?: CallOptions): Promise<KindInfo>;
  listKinds(options?: CallOptions): Promise<KindInfo[]>;
  deleteKind(name: string, options?: CallOptions): Promise<void>;

  createWorkflow(definition: object, options?: CallOptions): Promise<{ id: string; [key: string]: unknown }>;
  getWorkflow(id: string, options?: CallOptions): Promise<{ id: string; [key: string]: unknown }>;
  deleteWorkflow(id: string, options?: CallOptions): Promise<void>;
  startRun(
    workflowId: string,
    input?: unknown,
    options?: { waitS?: number; idempotencyKey?: string; callbackUrl?: string } & CallOptions,
  ): Promise<Run>;
  getRun(id: string, options?: { waitS?: number } & CallOptions): Promise<Run>;
  waitRun(id: string, options?: WaitOptions): Promise<Run>;
  cancelRun(id: string, options?: CallOptions): Promise<Run>;
  streamRun(id: string, options?: StreamOptions): AsyncGenerator<EventEnvelope, void, undefined>;

  createSchedule(spec: ScheduleSpec, options?: CallOptions): Promise<Schedule>;
  getSchedule(id: string, options?: CallOptions): Promise<Schedule>;
  listSchedules(query?: { limit?: number; cursor?: string }, options?: CallOptions): Promise<Page<Schedule>>;
  deleteSchedule(id: string, options?: CallOptions): Promise<void>;

  registerWorker(spec: WorkerRegistrationSpec, options?: CallOptions): Promise<WorkerRegistration>;
  leaseJobs(workerId: string, options?: { maxJobs?: number; waitMs?: number } & CallOptions): Promise<Lease[]>;
  /** Complete up to 100 jobs in one call; one entry per job: null when recorded, else the typed error. */
  completeJobs(
    workerId: string,
    jobs: { id: string; lease: string; output?: unknown }[],
    options?: CallOptions,
  ): Promise<(ProblemError | null)[]>;
  deregisterWorker(workerId: string, options?: CallOptions): Promise<void>;
  listWorkers(options?: CallOptions): Promise<Array<{ id: string; name: string; status: string; [key: string]: unknown }>>;
}

/** Whether a job status is final. */
export function isTerminal(status: string): boolean;
/** The `POST /v1/jobs` body of `kind`, `input` and options. */
export function submission(kind: string, input?: unknown, options?: SubmitOptions): Record<string, unknown>;

/** A leased job and the lease-scoped calls (each sends `Capibara-Lease`; a stale token throws `LeaseLostError`). */
export class Lease {
  constructor(client: Client, item: { job: JobInfo; lease: { token: string; expires_at: string } });
  readonly client: Client;
  readonly job: JobInfo;
  readonly token: string;
  expiresAt: string;
  readonly jobId: string;
  heartbeat(options?: CallOptions): Promise<{ cancel_requested: boolean; expires_at: string }>;
  progress(progress: ProgressReport, options?: CallOptions): Promise<void>;
  logs(lines: Array<{ level: LogLevel; message: string }>, options?: CallOptions): Promise<void>;
  chunk(seq: number, data: unknown, options?: CallOptions): Promise<void>;
  complete(output?: unknown, options?: CallOptions): Promise<JobInfo>;
  fail(error: JobError, options?: { retryable?: boolean; retryAfterS?: number } & CallOptions): Promise<JobInfo>;
  release(options?: CallOptions): Promise<JobInfo>;
}

// ---------------------------------------------------------------- worker

export type LogLevel = "debug" | "info" | "warn" | "error";

export interface ProgressReport {
  /** 0–100. */
  percent?: number;
  message?: string;
  data?: unknown;
}

export interface Logger {
  debug(message: string, fields?: unknown): void;
  info(message: string, fields?: unknown): void;
  warn(message: string, fields?: unknown): void;
  error(message: string, fields?: unknown): void;
}

export const defaultLogger: Logger;

/** What a handler receives. */
export class Job<Input = any> {
  readonly id: string;
  readonly kind: string;
  readonly input: Input;
  readonly attempt: number;
  readonly maxAttempts: number;
  readonly tags: Record<string, string>;
  /**
   * Aborted when the job is canceled (`CanceledError`), times out (`JobTimeoutError`), loses
   * its lease (`LeaseLostError`) or is released at shutdown (`ShutdownError`): `signal.reason`.
   */
  readonly signal: AbortSignal;
  /** The job as leased. */
  readonly data: JobInfo<Input>;
  readonly lease: Lease;
  /** Best effort; throws only `LeaseLostError`. */
  progress(progress: ProgressReport): Promise<void>;
  /** Best effort; throws only `LeaseLostError`. */
  log(message: string, level?: LogLevel): Promise<void>;
  /** An output chunk (numbered from 0) streamed to SSE readers. Best effort. */
  chunk(data: unknown): Promise<void>;
}

export type Handler<Input = any, Output = any> = (job: Job<Input>) => Output | Promise<Output>;

export interface HandlerOptions {
  description?: string;
  queue?: string;
  inputSchema?: object;
  outputSchema?: object;
  timeoutS?: number;
  maxAttempts?: number;
  priority?: Priority;
}

export interface WorkerOptions {
  /** Default `new Client()` (from the environment). */
  client?: Client;
  /** Jobs run at once (default 32). */
  concurrency?: number;
  name?: string;
  labels?: Record<string, string>;
  version?: string;
  /** Default: each kind's queue. */
  queues?: string[];
  /** On stop, how long running handlers may finish before they are released (default 30000). */
  graceMs?: number;
  /** Long-poll hold of a lease call (default 30000). */
  pollMs?: number;
  logger?: Logger;
}

export class Worker {
  constructor(options?: WorkerOptions);
  readonly client: Client;
  concurrency: number;
  graceMs: number;
  /** The registration answer once started. */
  registration: WorkerRegistration | null;
  readonly id: string | undefined;
  /** Jobs running now. */
  readonly running: number;
  /** Run `handler` for jobs of `kind`; options are the kind's spec, sent at registration. */
  handle<Input = any, Output = any>(kind: string, handler: Handler<Input, Output>, options?: HandlerOptions): this;
  /** The `kinds` of the registration. */
  kinds(): WorkerRegistrationSpec["kinds"];
  /** Register, then lease and run jobs in the background. */
  start(): Promise<WorkerRegistration>;
  /** Start and run until SIGTERM/SIGINT or `stop()`; resolves after the shutdown. */
  run(options?: { signals?: string[] }): Promise<void>;
  /** Stop leasing, wait up to `graceMs` for running handlers, release the rest, deregister. */
  stop(options?: { graceMs?: number }): Promise<void>;
}

// ---------------------------------------------------------------- SSE

export interface SSEEvent {
  id: string;
  event: string;
  data: string;
  retry: number | undefined;
}

/** Parse a text/event-stream body split in any pieces. */
export function parseSSE(chunks: AsyncIterable<Uint8Array | string>): AsyncGenerator<SSEEvent, void, undefined>;

export const VERSION: string;
