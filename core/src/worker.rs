//! The handler runtime: binds handlers to queues and settles deliveries.
