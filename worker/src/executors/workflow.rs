//! `workflow.wait`: the job a workflow `wait` step runs as. The job core's delayed start
//! (`run_at`) is the durable timer; by the time a worker runs the job the wait is over.

use async_trait::async_trait;
use serde_json::json;

use super::{ExecError, Executor, JobContext, Output};

pub struct Wait;

#[async_trait]
impl Executor for Wait {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        Ok(Output {
            output: json!({"waited_until": ctx.input.get("until")}),
            ..Default::default()
        })
    }
}
