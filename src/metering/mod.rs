//! Money: prices per token class and the usage record each request leaves behind.

mod pricing;
mod record;

pub use pricing::{
    usd, Asked, Price, PriceTable, ProviderRef, Rates, DEFAULT_CONTEXT_WINDOW, DEFAULT_MAX_OUTPUT, DEFAULT_PRICES,
};
pub use record::{AttemptRecord, Estimate, Outcome, UsageRecord};
