fn main() -> std::process::ExitCode {
    mdsec_agent::cli::main()
}
