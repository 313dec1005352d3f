// Proxying allocates and frees frame-sized buffers on every read; glibc's
// malloc hands such memory back to the kernel and faults it in again (about
// one page fault per 4 KiB relayed, measured). jemalloc keeps it.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    relaygate_agent::cli::main()
}
