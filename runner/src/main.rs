//! The `stagehand` binary: parse arguments, run, exit with the code the run decided.
fn main() {
    std::process::exit(stagehand::cli::main());
}
