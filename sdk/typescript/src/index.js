// Capibara SDK for Node: a client of the API and a worker that runs your handlers by kind.
export { Client, isTerminal, submission } from "./client.js";
export { Worker, Job, defaultLogger } from "./worker.js";
export { Lease } from "./lease.js";
export { parseSSE } from "./sse.js";
export { VERSION } from "./http.js";
export {
  CapibaraError,
  NetworkError,
  WaitTimeoutError,
  ProblemError,
  UnauthorizedError,
  ForbiddenError,
  NotFoundError,
  ConflictError,
  LeaseLostError,
  ValidationError,
  RateLimitedError,
  UnavailableError,
  CanceledError,
  JobTimeoutError,
  ShutdownError,
  FatalError,
  RetryAfterError,
  errorFromResponse,
} from "./errors.js";
