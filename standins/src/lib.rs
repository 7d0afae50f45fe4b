//! Stand-ins for what surrounds switchyard in production, kept out of the proxy's
//! library: app servers ([`app`]), a load client ([`load`]), the deploy rehearsal that
//! puts both around a real switchyard process ([`rehearsal`]), and `switchyard demo`'s
//! servers and guide ([`demo`]). The binary and the integration tests share this one
//! implementation.

pub mod app;
pub mod body;
pub mod demo;
pub mod load;
pub mod process;
pub mod rehearsal;
#[cfg(feature = "test-paths")]
pub mod test_paths;
