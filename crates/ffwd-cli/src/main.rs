//! The `ffwd` command line. Library errors are reported in one line and exit code 1.

mod cli;

fn main() {
    if let Err(e) = cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
