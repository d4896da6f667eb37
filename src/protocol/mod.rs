//! Wire formats: pure code, no I/O, so it can be tested and benchmarked alone.

pub mod bedrock;
pub mod eventstream;
pub mod inbound;
pub mod json_peek;
pub mod sse;
pub mod usage;
pub mod vertex;
