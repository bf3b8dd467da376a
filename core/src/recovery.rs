//! Client-agnostic connection recovery shared by the AMQP transports:
//! the registry of declared topology and consumers, the buffer of
//! unconfirmed publishes, and reconnect backoff.
