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
    keep_freed_memory();
    ccnode_worker::engine::pin_thread_count();
    // SAFETY: this is the worker process; the jail put the control socket
    // at fd 3 and nothing in this process has taken it.
    let Some(sock) = (unsafe { ccnode_worker::serve::inherited_socket() }) else {
        eprintln!("ccnode-worker: no control socket at fd 3 (it is started by ccnoded only)");
        return ExitCode::from(ccnode_worker::serve::EXIT_PROTOCOL);
    };
    ccnode_worker::serve::run(sock, ccnode_worker::protocol::FIRST_MODEL_FD)
}

/// Fixes glibc's allocator thresholds so that a generation's buffers are
/// reused, not mapped afresh. With the defaults, each prefill's large
/// activations (a few MiB each) were new mmaps or trimmed heap that
/// page-faulted back in: about 22,000 minor faults (some 90 MB of zeroed
/// pages) before every first token on the benchmark model, none in the
/// in-process peers (docs/benchmarks.md, "Inference overhead").
/// Allocations below 32 MiB come from the heap, and up to 1 GiB of freed
/// heap stays mapped. The cost: the worker keeps its peak working set
/// (bounded by the sandbox's memory.max where it has one).
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before this process starts any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
