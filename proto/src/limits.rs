//! Size and time limits both sides apply, with HTTP.sys's and IIS's defaults.

/// Bytes of request line and headers (HTTP.sys `MaxRequestBytes`); more is 431.
pub const DEFAULT_MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Bytes of request target (HTTP.sys `MaxFieldLength`); more is 414.
pub const DEFAULT_MAX_URL: usize = 16 * 1024;
/// Bytes of request body (IIS `maxAllowedContentLength`, 30,000,000); more is 413.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 30_000_000;
/// The largest `max_request_head` or `max_url` a config may set. Every buffer a head travels
/// through (the dispatcher's, a handoff message, a worker's receive buffer) holds at least
/// this, so a head the front end accepts always reaches the worker whole.
pub const MAX_HEAD_LIMIT: usize = 64 * 1024;
/// The smallest `max_request_head` a config may set.
pub const MIN_REQUEST_HEAD: usize = 256;
/// The smallest `max_url` a config may set.
pub const MIN_URL: usize = 64;
/// Header lines accepted in one request head; more is 431.
pub const MAX_HEADERS: usize = 100;

/// What a request head is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    pub max_request_head: usize,
    pub max_url: usize,
    pub max_request_body: u64,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            max_request_head: DEFAULT_MAX_REQUEST_HEAD,
            max_url: DEFAULT_MAX_URL,
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
        }
    }
}
