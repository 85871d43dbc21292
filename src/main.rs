use anyhow::Result;
use clap::{Parser, Subcommand};
use clip_wgpu::gpu::{adapter, AdapterRequest};

#[derive(Parser)]
#[command(name = "clip-wgpu", version, about = "Train CLIP-style image-text models on any GPU through wgpu")]
struct Cli {
    /// Backend: vulkan, metal, dx12, gl or all (env CLIP_WGPU_BACKEND).
    #[arg(long, global = true)]
    backend: Option<String>,
    /// Adapter index as listed by `clip-wgpu info` (env CLIP_WGPU_ADAPTER).
    #[arg(long, global = true)]
    adapter: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List every adapter found, with backend, type, driver, limits and features.
    Info,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let req = AdapterRequest {
        backend: cli.backend,
        index: cli.adapter,
    }
    .with_env()?;
    match cli.cmd {
        Cmd::Info => info(&req),
    }
}

fn info(req: &AdapterRequest) -> Result<()> {
    let adapters = adapter::enumerate(req.backends()?);
    if adapters.is_empty() {
        anyhow::bail!(
            "no adapter found. On Linux without a GPU: `apt-get install mesa-vulkan-drivers libvulkan1`"
        );
    }
    for (i, a) in adapters.iter().enumerate() {
        println!("{}", adapter::describe(i, a));
    }
    let chosen = adapter::choose(req)?.get_info();
    println!("\ndefault choice: {} ({:?}, {:?})", chosen.name, chosen.backend, chosen.device_type);
    Ok(())
}
