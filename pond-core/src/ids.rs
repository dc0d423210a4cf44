//! Identifiers. Run ids are UUIDv7, so they sort by creation time and serve as list cursors.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::time::Timestamp;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new id whose time part is `now`, so ids sort by creation time.
            pub fn generate(now: Timestamp) -> Self {
                let ms = now.as_millis().max(0) as u64;
                let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, ((ms % 1000) * 1_000_000) as u32);
                $name(Uuid::new_v7(ts))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }
    };
}

uuid_id!(
    /// Identifies a run.
    RunId
);
uuid_id!(
    /// Identifies a stored blob (an uploaded source bundle or an artifact's bytes).
    BlobId
);
uuid_id!(
    /// Identifies an API token.
    TokenId
);
