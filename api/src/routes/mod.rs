//! HTTP routes: one module per resource, plus the probes.

pub mod health;
pub mod jobs;
pub mod programs;

use poem_openapi::Tags;

#[derive(Tags)]
pub enum Tag {
    /// Functions: upload, list, run.
    Programs,
    /// Jobs: status, results, logs, stop, in-job callbacks.
    Jobs,
}
