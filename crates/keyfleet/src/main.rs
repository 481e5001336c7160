//! The `keyfleet` binary: parses the command line, then hands over to the library code of the
//! authority, the verifier, the admin CLI or the demo.

mod cli;
mod client;
mod demo;
mod exit;
mod loadtest;
mod servers;
mod session;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    ExitCode::SUCCESS
                }
                // The command line itself is wrong.
                _ => ExitCode::from(exit::EXIT_CONFIG),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            // EX_OSERR: the system refused threads or descriptors.
            return ExitCode::from(71);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain, each cause once; the exit code is told by its types (exit.rs).
            eprintln!("error: {}", keyfleet_runtime::error_chain(e.as_ref()));
            ExitCode::from(exit::exit_code(&e))
        }
    }
}
