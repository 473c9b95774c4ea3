//! Device-level tests.
