//! HTTP tests through a real listener on port 0.

mod api;
mod concurrency;
mod hostile;
mod isolation;
mod support;
