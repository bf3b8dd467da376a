//! Runtime scenarios: Worker settlement, RPC round trip and timeout,
//! graceful shutdown without loss.

use super::Case;

/// The runtime scenarios.
pub(crate) fn cases() -> Vec<Case> {
    Vec::new()
}
