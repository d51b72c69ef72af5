//! URL canonicalization lives in `sluice_common`, shared with the workers (which hand back a
//! request whose canonical path belongs to another pool).
pub use sluice_proto::canonical::*;
