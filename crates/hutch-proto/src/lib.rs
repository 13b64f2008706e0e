//! The host-guest protocol: one byte stream (virtio-serial on QEMU, vsock on Firecracker) carries a version
//! handshake, then yamux-multiplexed streams; each stream starts with one typed [`Request`] frame.
//!
//! The same code runs on both ends: the host (`hutch-sandbox`) is the yamux client, the guest agent the server.

pub mod frame;
pub mod handshake;
pub mod msg;
pub mod mux;

pub use frame::{FrameError, Framed};
pub use handshake::{HandshakeError, Hello, HelloAck, Ready};
pub use msg::*;
pub use mux::{MuxError, Session};

/// Bumped on any incompatible change to the messages below; both ends refuse a mismatch at the handshake.
pub const PROTOCOL_VERSION: u32 = 5;

/// Name of the virtio-serial port (and, later, the vsock port's purpose) that carries the protocol.
pub const AGENT_PORT_NAME: &str = "hutch.agent";

/// The serial number of the workspace drive, by which the guest finds it (the VMM gives it to the drive).
pub const WORKSPACE_SERIAL: &str = "hutch-workspace";

/// The serial number of the workspace base drive: the earlier full image whose blocks a delta image's unchanged
/// files still point into (an erofs extra device).
pub const WORKSPACE_BASE_SERIAL: &str = "hutch-ws-base";

/// Where the workspace overlay goes in the guest.
pub const WORKSPACE_DIR: &str = "/workspace";

/// Largest frame either end accepts; bigger payloads are sent as several chunks.
pub const MAX_FRAME: usize = 1 << 20;

/// Size of data chunks (exec output, file contents).
pub const CHUNK: usize = 64 * 1024;
