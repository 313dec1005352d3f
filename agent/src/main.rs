fn main() -> std::process::ExitCode {
    relaygate_agent::cli::main()
}
