//! `ctpf-agent`: see the library for what it does; this only maps arguments and exit codes.

use std::process::ExitCode;

use ctpf_discovery_agent::cli::{self, Command, USAGE};

fn main() -> ExitCode {
    let config = match cli::parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("ctpf-agent: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match ctpf_discovery_agent::run(&config, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ctpf-agent: error: {err}");
            ExitCode::FAILURE
        }
    }
}
