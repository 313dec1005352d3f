// Proxying allocates and frees frame-sized buffers on every read; glibc's
// malloc hands such memory back to the kernel and faults it in again (about
// one page fault per 4 KiB relayed, measured). jemalloc keeps it.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Pages freed under load stay for reuse; after five seconds unused a
/// background thread gives them
/// back to the kernel, so RSS follows what the process holds (jemalloc's
/// default: ten seconds, and lazily freed pages that still count in RSS).
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0\0"[0];

fn main() -> std::process::ExitCode {
    relaygate_agent::cli::main()
}
