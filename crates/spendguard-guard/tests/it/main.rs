//! Integration tests of the Guard against real stores.

mod airtight;
mod crash;
mod durability;
mod outage;
mod support;
