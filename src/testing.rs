//! What the demo, the tests and the benchmarks share: an embedded mock Convocore, its sample
//! exports, and the accept loop of test servers.

pub mod mock;
pub mod samples;
pub mod serve;
