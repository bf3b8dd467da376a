//! Connection and engine configuration (placeholder until the engine lands).
