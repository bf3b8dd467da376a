//! Placeholder until the memory transport lands.
fn main() {}
