//! Support for hb's integration tests.
