//! ccnode-jail: confines and starts one worker. Started by ccnoded (or a
//! test) with the worker's profile on fd 3; see `ccnode_sandbox::jail`.

fn main() {
    ccnode_sandbox::jail::main()
}
