//! The `postern-load` binary: parses the command line, runs `send` or `sink`, and maps the
//! outcome to an exit code (0 done, 1 the run could not start or nothing was accepted, 2 a
//! wrong flag, also one found only once the run starts, such as a --target that is not
//! loopback, reported on one line that names it). mimalloc is the allocator, as in postern.

// The same ring set-up as postern's (no completion interrupts), from the same file.
#[path = "../../crates/postern/src/ring.rs"]
mod ring;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use postern_load::cli::{Cli, Command};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // No transparent huge pages: the first touch of each 2 MiB the allocator takes would
    // have the kernel zero it while a connection waits, milliseconds that the first
    // connections' latencies would count as the server's.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if matches!(
                e.kind(),
                ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                eprintln!(
                    "postern-load: a command is required: try 'postern-load send' or \
                     'postern-load sink' (see --help)"
                );
                return ExitCode::from(2);
            }
            // clap's first paragraph names the flag; its usage and tips follow, not needed.
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("postern-load: {} (see --help)", first.join(" "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Send(args) => postern_load::send::run(*args),
        Command::Sink(args) => postern_load::sink::run(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("postern-load: {e}");
            // A flag that cannot work here (found once the run looks at the machine or the
            // target) is a wrong flag, as one clap refuses is.
            ExitCode::from(if e.is_flag() { 2 } else { 1 })
        }
    }
}
