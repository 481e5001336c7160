//! The `keyfleet` binary: parses the command line, then hands over to the library code of the
//! authority, the verifier, the admin CLI or the demo.

mod cli;
mod client;
mod demo;
mod loadtest;

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
                // EX_USAGE: the command line itself is wrong.
                _ => ExitCode::from(64),
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
            return ExitCode::from(71);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // The exit code rides along as a context layer; the operator reads the message.
            let code = e.downcast_ref::<cli::Exit>().map_or(1, |x| x.0);
            let message: Vec<String> = e
                .chain()
                .filter(|cause| !cause.is::<cli::Exit>())
                .map(ToString::to_string)
                .collect();
            eprintln!("error: {}", message.join(": "));
            ExitCode::from(code)
        }
    }
}
