//! The `hutch-agent` binary: `init` when started as the guest's PID 1; `workspace-changes` as a step of the
//! host's change collection.

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let code = match mode.as_str() {
        "init" => hutch_agent::init::run(),
        "workspace-changes" => hutch_agent::workspace::changes_main(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => {
            eprintln!("usage: hutch-agent init\n(hutch-agent runs inside a Hutch VM as its init; it is not meant to be run by hand)");
            2
        }
    };
    std::process::exit(code);
}
