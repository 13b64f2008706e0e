//! The guest agent: sets the guest up as PID 1, then serves the host's requests (exec, files, identity) over
//! multiplexed streams on the agent port.

pub mod exec;
pub mod files;
pub mod identity;
pub mod init;
pub mod net;
pub mod port;
pub mod serve;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Serves one session on stdin/stdout (used by host-side tests of the protocol and the exec engine).
pub fn serve_stdio() -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hutch-agent: cannot start runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        let io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        let state = serve::State::default();
        match serve::session(io, &state, true).await {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("hutch-agent: {e}");
                1
            }
        }
    })
}
