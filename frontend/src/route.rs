//! Prefix routing lives in `sluice_common`, shared with the workers.
pub use sluice_proto::route::*;
