fn main() -> std::process::ExitCode {
    relaygate_gateway::cli::main()
}
