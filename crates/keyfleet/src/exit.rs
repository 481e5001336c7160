//! How an error becomes the process's exit code (sysexits.h): 64 for a configuration that
//! cannot be used, 69 for a server that cannot be reached, 1 for anything else.
//!
//! One mechanism: [`exit_code`] looks for typed errors in the error's chain. The libraries'
//! errors are recognised by type (a refused configuration, TLS material, a URL); what the CLI
//! itself finds wrong carries a [`CliError`], attached as context so the cause stays chained.
//! The number is never printed: `main` prints the message chain.

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code for an unreachable server (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// What the CLI itself judged wrong; the message says what to do. Return it alone
/// (`Err(CliError::Usage(..).into())`) or attach it to a cause (`.context(CliError::…)`).
#[derive(Debug)]
pub enum CliError {
    /// The command line or its environment cannot be used as given (exit 64).
    Usage(String),
    /// The server the command names did not answer (exit 69).
    Unavailable(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m) | CliError::Unavailable(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CliError {}

/// The exit code `e` means: the CLI's own judgement when it made one, else 64 for a refused
/// configuration anywhere in the chain, 69 for a server that could not be reached, else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(judged) = find::<CliError>(e) {
        return match judged {
            CliError::Usage(_) => EXIT_CONFIG,
            CliError::Unavailable(_) => EXIT_UNAVAILABLE,
        };
    }
    // What the servers refuse to start with, the TLS material and URLs of any command.
    let bad_config = find::<keyfleet_authority::OpenError>(e).is_some()
        || find::<keyfleet_authority::KekError>(e).is_some()
        || find::<keyfleet_verifier::ConfigError>(e).is_some()
        || find::<keyfleet_verifier::OpenError>(e).is_some()
        || find::<keyfleet_runtime::tls::TlsError>(e).is_some()
        || find::<keyfleet_runtime::client::EndpointError>(e).is_some();
    if bad_config {
        return EXIT_CONFIG;
    }
    let unreachable = matches!(
        find::<keyfleet_runtime::client::ConnectError>(e),
        Some(keyfleet_runtime::client::ConnectError::Unreachable { .. })
    );
    if unreachable { EXIT_UNAVAILABLE } else { 1 }
}

/// The first `T` in `e`: a context layer or the root (`downcast_ref`), or any cause below
/// (`source()`, which `downcast_ref` does not look into).
fn find<T>(e: &anyhow::Error) -> Option<&T>
where
    T: std::error::Error + Send + Sync + 'static,
{
    e.downcast_ref::<T>()
        .or_else(|| e.chain().find_map(|cause| cause.downcast_ref::<T>()))
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn typed_errors_map_to_the_documented_codes() {
        let io = || std::io::Error::other("disk on fire");
        let usage = Err::<(), _>(io())
            .context(CliError::Usage("cannot read the admin token file".into()))
            .unwrap_err();
        assert_eq!(exit_code(&usage), EXIT_CONFIG);
        // The message chain keeps the cause, and no number.
        assert_eq!(
            format!("{usage:#}"),
            "cannot read the admin token file: disk on fire"
        );
        let down = anyhow::Error::new(CliError::Unavailable("list keys: unavailable".into()));
        assert_eq!(exit_code(&down), EXIT_UNAVAILABLE);
        // A library's configuration error, however deep under context.
        let tls = keyfleet_runtime::tls::TlsError::NoKey;
        let e = anyhow::Error::new(tls)
            .context("loading --tls-key")
            .context("starting");
        assert_eq!(exit_code(&e), EXIT_CONFIG);
        assert_eq!(exit_code(&anyhow::Error::new(io())), 1);
    }
}
