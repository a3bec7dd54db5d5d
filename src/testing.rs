//! What the demo, the tests and the benchmarks share: an embedded mock Convocore and its
//! sample exports.

pub mod mock;
pub mod samples;
