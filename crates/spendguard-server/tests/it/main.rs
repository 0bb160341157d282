//! HTTP tests through a real listener on port 0.

mod alerts;
mod analytics;
mod api;
mod browser;
mod concurrency;
mod contract;
mod dashboard;
mod exposition;
mod fuzz;
mod hostile;
mod import;
mod isolation;
mod limits;
mod postgres_sql;
mod prices;
mod security;
mod shadow;
mod support;
mod tenants;
