//! One module per resource.

pub mod admin;
pub mod artifacts;
pub mod bulk;
pub mod code;
pub mod connectors;
pub mod content;
pub mod deliveries;
pub mod events;
pub mod fine_tuning;
pub mod http;
pub mod jobs;
pub mod kinds;
pub mod limits;
pub mod llm;
pub mod models;
pub mod orchestrate;
pub mod runs;
pub mod schedules;
pub mod secrets;
pub mod semantic;
pub mod subscriptions;
pub mod trainers;
pub mod triggers;
pub mod tts;
pub mod workers;
pub mod workflows;
