// Successes sent together (`POST /v1/workers/{id}/complete`): a job that finishes while no
// batch is in flight sends one at once; jobs that finish meanwhile wait for it and go in the
// next, up to 100 per request. Under load one request (and one group commit on the server)
// records many jobs; a lone job is not delayed.

const MAX = 100;

export class Completions {
  /** @param {import("./client.js").Client} client */
  constructor(client) {
    this.client = client;
    /** @type {{workerId: string, lease: import("./lease.js").Lease, output: unknown, resolve: Function, reject: Function}[]} */
    this.pending = [];
    this.sending = false;
  }

  /**
   * Record `lease`'s job as succeeded with `output`, under worker `workerId` (the registration
   * that leased it). Rejects with what `lease.complete` would (`LeaseLostError`,
   * `ValidationError`, …).
   */
  complete(workerId, lease, output) {
    return new Promise((resolve, reject) => {
      this.pending.push({ workerId, lease, output, resolve, reject });
      if (!this.sending) {
        this.sending = true;
        this.#sendPending();
      }
    });
  }

  async #sendPending() {
    while (this.pending.length > 0) {
      // One worker id per request (a worker that registered again has two).
      const workerId = this.pending[0].workerId;
      const batch = [];
      const rest = [];
      for (const c of this.pending) {
        (c.workerId === workerId && batch.length < MAX ? batch : rest).push(c);
      }
      this.pending = rest;
      let errors;
      try {
        errors = await this.client.completeJobs(
          workerId,
          batch.map((c) => ({ id: c.lease.jobId, lease: c.lease.token, output: c.output })),
        );
      } catch (err) {
        errors = batch.map(() => err); // the whole batch failed: each job's report did
      }
      batch.forEach((c, i) => {
        const err = i < errors.length ? errors[i] : new Error("the batch answer has no result for this job");
        if (err) c.reject(err);
        else c.resolve();
      });
    }
    this.sending = false;
  }
}
