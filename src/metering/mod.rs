//! Money: prices per token class and the usage record each request leaves behind.

mod pricing;
mod record;

pub use pricing::{usd, Price, PriceTable, Rates, DEFAULT_PRICES};
pub use record::{Outcome, UsageRecord};
