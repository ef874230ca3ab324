use std::process::ExitCode;

fn main() -> ExitCode {
    match netctl::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
