//! The gateway's integration tests: a real listener, a real guard over SQLite (or
//! PostgreSQL), and the mock upstream.

mod gateway;
mod sdk;
mod support;
