//! Models the worker runs in-process (docs/models.md).

pub mod bert;
pub mod chunker;
pub mod classifier;
pub mod coalesce;
pub mod device;
pub mod encoder;
pub mod vector_index;
