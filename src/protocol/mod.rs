//! Wire formats: pure code, no I/O, so it can be tested and benchmarked alone.

pub mod bedrock;
pub mod eventstream;
pub mod inbound;
pub mod json_peek;
pub mod references;
pub mod sse;
pub mod usage;
pub mod vertex;

/// Whether `id` can stand as a model in a provider's URL path: the characters model ids,
/// inference-profile ARNs and Vertex version tags use (`.`, `:`, `@`, `/`, `-`, `_`), and no
/// empty, `.` or `..` segment that a server could resolve as a path step.
pub fn is_path_safe_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 512
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'@' | b'/' | b'-' | b'_'))
        && id.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}
