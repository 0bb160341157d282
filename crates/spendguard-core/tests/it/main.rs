//! Integration tests of the core ledger through its public API.

mod catalog;
mod cluster;
mod concurrency;
mod ledger;
mod properties;
mod restore;
mod shadow;
mod support;
mod tenants;
