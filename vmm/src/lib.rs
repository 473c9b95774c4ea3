//! The microvm VMM library.
