//! The guest agent: sets the guest up as PID 1, then serves the host's requests (exec, files, identity) over
//! multiplexed streams on the agent port.

pub mod exec;
pub mod files;
pub mod identity;
pub mod init;
pub mod net;
pub mod port;
pub mod serve;
pub mod workspace;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
