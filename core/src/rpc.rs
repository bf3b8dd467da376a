//! RPC over a broker: one reply queue per client, a correlation-id map.
