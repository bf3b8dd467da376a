//! Ack coalescing shared by the AMQP transports: one `multiple` ack over the
//! contiguous prefix of settled delivery tags, never past an unfinished one.
