//! What the demo, the tests and the benchmarks share: an embedded mock Convocore.

pub mod mock;
