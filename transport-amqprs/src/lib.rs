//! switchyard transport (amqprs): under construction.
