//! # vitaltrail-node
//!
//! Composition: which stages run in one process, over which bus, with
//! which settings. Each stage crate owns its run loop
//! (`vitaltrail_ingest::run`, `vitaltrail_attestor::run`); this crate
//! only wires them together and owns:
//!
//! - [`config`]: the layered configuration (built-in defaults, then
//!   `vitaltrail.toml`, then `VITALTRAIL_*` environment variables, then
//!   command-line flags), with unknown keys rejected and secrets redacted
//!   when printed;
//! - [`up`]: `vitaltrail up`, every stage in one process (the embedded
//!   broker and its device gate, ingest, the in-process bus or Kafka, the
//!   attestor, the HTTP server), stopped in order: ingest drains first;
//! - [`process`]: `vitaltrail ingest` and `vitaltrail attest`, one stage
//!   per process over Kafka, each with its `/metrics`;
//! - [`http`]: `/metrics`, `POST /sql`, `/healthz` and `/readyz`.
//!
//! The binary parses arguments into a [`config::Overrides`] and calls one
//! of these `run(config, shutdown)` functions.

pub mod config;
mod error;
pub mod http;
pub mod process;
pub mod up;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use config::NodeConfig;
pub use error::{Error, Result};
use vitaltrail_bus::registry::{Lookup, SharedRegistry};

/// Make every panic, on any thread (the embedded broker's included), end
/// the process with code 70: a stage that died must never leave a zombie
/// that accepts connections and logs nothing. Every acknowledgement waits
/// for durability, so a restart loses nothing that was acknowledged by the
/// pipeline.
pub fn exit_on_panic() {
    exit_on_panic_with(SERVICE_PANIC_EXIT);
}

/// The exit code of a service that panicked (`EX_SOFTWARE`).
pub const SERVICE_PANIC_EXIT: i32 = 70;

/// On any panic: print its message (the standard hook), then exit the
/// process with `code`. The release build aborts on panic (issue #18);
/// exiting from the hook first means a clean exit code (101 for a one-shot
/// command, as an unwinding panic gave, [`SERVICE_PANIC_EXIT`] for a
/// service) and never a core file that could hold a key. Called again, it
/// only changes the code.
pub fn exit_on_panic_with(code: i32) {
    use std::sync::atomic::{AtomicI32, Ordering};
    static CODE: AtomicI32 = AtomicI32::new(101);
    static HOOK: std::sync::Once = std::sync::Once::new();
    CODE.store(code, Ordering::SeqCst);
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            let code = CODE.load(Ordering::SeqCst);
            if code == SERVICE_PANIC_EXIT {
                eprintln!(
                    "vitaltrail: a thread panicked; exiting so that a supervisor restarts the process"
                );
            }
            std::process::exit(code);
        }));
    });
}

/// Wait until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::StageStopped(format!(
                "nothing is listening on {addr} after {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start an open embedded MQTT broker on `listen`, with no gate and no
/// authentication: for benchmarks and tests of the transport only, never
/// for devices. The returned future resolves, with the reason, if the
/// broker stops.
pub fn start_embedded_broker(
    listen: SocketAddr,
) -> Result<impl std::future::Future<Output = Result<()>> + Send + 'static> {
    let dead =
        vitaltrail_mqtt::embedded::start(&vitaltrail_mqtt::embedded::EmbeddedConfig::open(listen))?;
    Ok(async move { dead.await.map_err(Error::from) })
}

/// Whether the registry holds a device as active (the gate's check).
pub fn device_check(reg: &SharedRegistry) -> vitaltrail_mqtt::gate::DeviceCheck {
    let reg = reg.clone();
    Arc::new(move |did: &str| reg.with(|r| matches!(r.lookup(did), Lookup::Active(_))))
}
