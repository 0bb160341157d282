//! Integration tests of the Guard against real stores.

mod crash;
mod durability;
mod outage;
mod support;
