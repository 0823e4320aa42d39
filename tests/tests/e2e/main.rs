//! The end-to-end suite in one test binary: each module was its own binary, which linked and
//! monomorphised the same client, runtime and store code twenty times over.

mod api_errors;
mod artifacts_s3;
mod bulk;
mod code_run;
mod connectors;
mod deliveries;
mod event_store;
mod examples;
mod failures;
mod firehose;
mod flow_control;
mod http_request;
mod isolation;
mod jobs_api;
mod keys_and_visibility;
mod kind_validation;
mod limits;
mod llm;
mod mail;
mod mcp;
mod models;
mod openapi;
mod openapi_fuzz;
mod operations;
mod orchestrate;
mod poison;
mod push_kinds;
mod receiver_selftest;
mod schedules;
mod sdks;
mod storage_connectors;
mod triggers;
mod tts;
mod user_workers;
mod workflows;
