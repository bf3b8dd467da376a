//! The `switchyard` command: see `switchyard --help`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = switchyard_cli::args::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(switchyard_cli::run(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", e.message);
            std::process::ExitCode::from(e.exit)
        }
    }
}
