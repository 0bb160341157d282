//! The bench's integration tests, one binary.

mod function;
mod smoke;
