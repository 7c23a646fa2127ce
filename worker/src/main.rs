use hive_jobs::config::{process_env, WorkerConfig};

// mimalloc: glibc's malloc and free were an eighth of the api's CPU under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    hive_jobs::telemetry::init();
    let config = match WorkerConfig::from_env(&process_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hive-worker: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = hive_worker::run(config, hive_jobs::telemetry::shutdown_signal()).await {
        eprintln!("hive-worker: {e}");
        std::process::exit(1);
    }
}
