//! Shared helpers for the integration tests (paths to the microvm binary and the guest).
