//! The `hutch-agent` binary: `init` when started as the guest's PID 1, `serve-stdio` for host-side tests.

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let code = match mode.as_str() {
        "init" => hutch_agent::init::run(),
        "serve-stdio" => hutch_agent::serve_stdio(),
        _ => {
            eprintln!("usage: hutch-agent init | serve-stdio\n(hutch-agent runs inside a Hutch VM as its init; it is not meant to be run by hand)");
            2
        }
    };
    std::process::exit(code);
}
