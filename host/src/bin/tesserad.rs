//! tesserad: the Tessera daemon. `tesserad` serves; `tesserad worker` is the worker mode the
//! daemon starts itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tessera_host::daemon::{self, Config};

#[derive(Parser)]
#[command(name = "tesserad", version, about = "The Tessera upscaling daemon")]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Directory for the socket and pixel buffers [default: $TESSERA_RUNTIME_DIR, $XDG_RUNTIME_DIR/tessera, or <tmp>/tessera-<uid>].
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Unix socket path [default: <runtime dir>/tesserad.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also listen on TCP, as `tcp:PORT` (loopback) or `tcp:HOST:PORT`; clients must send the token.
    #[arg(long, value_name = "tcp:[HOST:]PORT")]
    listen: Option<String>,
    /// Allow --listen on a non-loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Plugin directory; repeat for several [default: $TESSERA_PLUGIN_DIR, or next to tesserad].
    #[arg(long = "plugins")]
    plugin_dirs: Vec<PathBuf>,
    /// Largest width or height of any buffer.
    #[arg(long)]
    max_side: Option<u32>,
    /// Most pixels in one buffer.
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Most bytes in one buffer.
    #[arg(long)]
    max_buffer_bytes: Option<u64>,
    /// Most bytes of live buffers per connection, results included.
    #[arg(long)]
    max_client_bytes: Option<u64>,
    /// Most live buffers per connection, results included.
    #[arg(long)]
    max_client_buffers: Option<u32>,
    /// Most jobs per connection queued or running at once.
    #[arg(long)]
    max_client_jobs: Option<u32>,
    /// Seconds a running job may take to stop after a cancel before its worker is restarted.
    #[arg(long, default_value_t = 10.0)]
    cancel_grace: f64,
    /// Seconds a worker may stay silent (no heartbeat) before it counts as hung and is replaced.
    #[arg(long, default_value_t = 10.0)]
    heartbeat_timeout: f64,
    /// Seconds a running job may go without reporting progress before its worker counts as
    /// stuck and is replaced.
    #[arg(long, default_value_t = 600.0)]
    stall_timeout: f64,
    /// Which devices get a worker: auto (the CPU and every CUDA card the driver reports), or a
    /// list such as cpu,cuda:1.
    #[arg(long, default_value = "auto")]
    devices: String,
    /// Exit after SECS with no client connected and no job (clients that start tesserad pass it).
    #[arg(long, value_name = "SECS")]
    idle_exit: Option<f64>,
}

#[derive(Subcommand)]
enum Mode {
    /// Worker mode: started by tesserad, not by people.
    #[command(hide = true)]
    Worker {
        #[arg(long, required_unless_present = "probe_devices")]
        ipc: Option<String>,
        #[arg(long = "plugins")]
        plugin_dirs: Vec<PathBuf>,
        /// The device whose jobs this worker runs: cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print the CUDA cards the driver reports, as JSON, and exit.
        #[arg(long)]
        probe_devices: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.mode {
        Some(Mode::Worker { probe_devices: true, .. }) => {
            println!("{}", serde_json::to_string(&tessera_host::devices::probe_here())?);
            Ok(())
        }
        Some(Mode::Worker { ipc, plugin_dirs, device, .. }) => {
            tessera_host::init_logging("info");
            tessera_host::worker::run(ipc.context("--ipc is required")?, plugin_dirs, device)
        }
        None => {
            tessera_host::init_logging("info");
            let mut config = Config::default();
            if let Some(dir) = args.runtime_dir {
                config.socket = dir.join("tesserad.sock");
                config.runtime_dir = dir;
            }
            if let Some(s) = args.socket {
                config.socket = s;
            }
            if let Some(l) = args.listen {
                config.tcp = Some(parse_listen(&l)?);
            }
            config.allow_remote = args.allow_remote;
            config.cancel_grace = std::time::Duration::from_secs_f64(args.cancel_grace.max(0.0));
            config.heartbeat_timeout = std::time::Duration::from_secs_f64(args.heartbeat_timeout.max(1.0));
            config.stall_timeout = std::time::Duration::from_secs_f64(args.stall_timeout.max(1.0));
            config.idle_exit = args.idle_exit.map(|s| std::time::Duration::from_secs_f64(s.max(0.0)));
            config.devices = tessera_host::devices::parse_list(&args.devices).map_err(anyhow::Error::msg)?;
            if !args.plugin_dirs.is_empty() {
                config.plugin_dirs = args.plugin_dirs;
            }
            let lim = &mut config.limits;
            lim.max_side = args.max_side.unwrap_or(lim.max_side);
            lim.max_pixels = args.max_pixels.unwrap_or(lim.max_pixels);
            lim.max_buffer_bytes = args.max_buffer_bytes.unwrap_or(lim.max_buffer_bytes);
            lim.max_client_bytes = args.max_client_bytes.unwrap_or(lim.max_client_bytes);
            lim.max_client_buffers = args.max_client_buffers.unwrap_or(lim.max_client_buffers);
            lim.max_client_jobs = args.max_client_jobs.unwrap_or(lim.max_client_jobs);
            daemon::run(config)
        }
    }
}

fn parse_listen(spec: &str) -> anyhow::Result<SocketAddr> {
    let Some(rest) = spec.strip_prefix("tcp:") else {
        bail!("--listen takes tcp:PORT or tcp:HOST:PORT, not `{spec}`");
    };
    if let Ok(port) = rest.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    rest.parse().with_context(|| format!("`{rest}` is not HOST:PORT"))
}
