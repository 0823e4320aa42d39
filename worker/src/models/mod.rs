//! Models the worker runs in-process (docs/models.md).

pub mod encoder;
