//! Data-plane tests.
