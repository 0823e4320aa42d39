use capibara_sdk::{Client, JobContext, Worker};
use serde_json::json;

#[tokio::main]
async fn main() -> capibara_sdk::Result<()> {
    let client = Client::from_env()?; // reads CAPIBARA_URL and CAPIBARA_API_KEY
    let worker = Worker::builder(client.clone())
        .handle("demo.greet", |job: JobContext| async move {
            job.progress(50.0, "thinking").await?;
            let name = job.input["name"].as_str().unwrap_or("you");
            Ok(json!({ "greeting": format!("Hello, {name}!") }))
        })
        .start() // registers the kind and this worker, then leases jobs in the background
        .await?;
    let job = client
        .submit("demo.greet", json!({ "name": "Ada" }))
        .await?;
    let done = client.wait(job.id, None).await?;
    println!("{}", done.output.unwrap_or_default()); // {"greeting":"Hello, Ada!"}
    worker.stop().await; // releases what still runs, then deregisters
    Ok(())
}
