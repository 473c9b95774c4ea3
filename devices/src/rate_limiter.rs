//! Token-bucket rate limiter (bytes/s and ops/s).
