//! ccnode-worker: the inference process ccnoded starts inside the sandbox.
//! It has no path to the model: its weights arrive as sealed memfds, its
//! orders on the control socket at fd 3 (docs/inference.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == "--help" || a == "-h")
    {
        println!(
            "ccnode-worker: ccnode's sandboxed inference worker.\n\n\
             Started by ccnoded only, inside the worker sandbox, with the control\n\
             socket at fd 3 and the verified model files as sealed memfds at fd 4\n\
             and up. It takes no arguments. See docs/inference.md."
        );
        return ExitCode::SUCCESS;
    }
    // SAFETY: this is the worker process; the jail put the control socket
    // at fd 3 and nothing in this process has taken it.
    let Some(sock) = (unsafe { ccnode_worker::serve::inherited_socket() }) else {
        eprintln!("ccnode-worker: no control socket at fd 3 (it is started by ccnoded only)");
        return ExitCode::from(ccnode_worker::serve::EXIT_PROTOCOL);
    };
    ccnode_worker::serve::run(sock, ccnode_worker::protocol::FIRST_MODEL_FD)
}
