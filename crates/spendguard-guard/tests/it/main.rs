//! Integration tests of the Guard against real stores.

mod airtight;
mod cluster;
mod crash;
mod dead_letters;
mod durability;
mod outage;
mod support;
mod writer_health;
