//! Settings from `RABBITMQ_*` environment variables.
