//! Paging of the listings (machines and snapshots): page sizes and the
//! opaque `page_token`. Both listings page by `seq`, so they share one
//! token format and one set of limits, kept here rather than in either.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::problem::ApiError;

pub(super) const DEFAULT_PAGE_SIZE: i64 = 50;
pub(super) const MAX_PAGE_SIZE: i64 = 500;

/// A page token: the `seq` of the last row of the page before (machines'
/// and snapshots' alike).
pub(super) fn encode_cursor(seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

pub(super) fn decode_cursor(token: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::bad_request("page_token is not a token this API returned");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix("seq:").and_then(|n| n.parse().ok()).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(42)).unwrap(), 42);
        assert!(decode_cursor("!!").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("seq:x")).is_err());
    }
}
