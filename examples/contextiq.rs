//! Placeholder: the seed's pipeline on the memory transport.
fn main() {}
