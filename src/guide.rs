//! The user guide (`docs/guide/`, an mdBook), compiled as doc tests: every
//! Rust sample of every chapter is compiled, and run unless marked
//! `no_run`, by `cargo test -p switchyard --doc`. Nothing here is part of
//! the public API (the module exists only under `cfg(doctest)`).

/// Introduction.
#[doc = include_str!("../docs/guide/src/introduction.md")]
pub struct Introduction;

/// Getting started.
#[doc = include_str!("../docs/guide/src/getting-started.md")]
pub struct GettingStarted;

/// Concepts.
#[doc = include_str!("../docs/guide/src/concepts.md")]
pub struct Concepts;

/// Middleware.
#[doc = include_str!("../docs/guide/src/middleware.md")]
pub struct Middleware;

/// Testing.
#[doc = include_str!("../docs/guide/src/testing.md")]
pub struct Testing;

/// Reliability.
#[doc = include_str!("../docs/guide/src/reliability.md")]
pub struct Reliability;

/// Operating.
#[doc = include_str!("../docs/guide/src/operating.md")]
pub struct Operating;

/// Migrating from the seed's Python services.
#[doc = include_str!("../docs/guide/src/migrating.md")]
pub struct Migrating;

/// Troubleshooting.
#[doc = include_str!("../docs/guide/src/troubleshooting.md")]
pub struct Troubleshooting;

/// Performance.
#[doc = include_str!("../docs/guide/src/performance.md")]
pub struct Performance;
