use anyhow::Result;
use clap::{Parser, Subcommand};
use clip_wgpu::gpu::{adapter, AdapterRequest, Settings};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "clip-wgpu",
    version,
    about = "Train CLIP-style image-text models on any GPU through wgpu"
)]
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
    /// Train (and evaluate) a CLIP model as transformers' run_clip.py does.
    /// With no model or data flags: the built-in demo. `clip-wgpu train --help` lists the flags.
    #[command(disable_help_flag = true)]
    Train {
        /// run_clip.py / Trainer flags, e.g. --model_name_or_path DIR --data_dir COCO --do_train.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Evaluate a model: eval_loss and retrieval recall@1/5/10 (image-to-text
    /// and text-to-image) on the validation data. Takes train's flags.
    #[command(disable_help_flag = true)]
    Eval {
        /// run_clip.py flags, e.g. --model_name_or_path DIR --validation_file val.csv.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build a VisionTextDualEncoder folder from a CLIP folder and a RoBERTa folder
    /// (VisionTextDualEncoderModel.from_vision_text_pretrained + save_pretrained).
    PrepareDualEncoder {
        /// CLIP (or CLIP vision) model folder.
        #[arg(long)]
        vision: PathBuf,
        /// RoBERTa model folder (with tokenizer.json).
        #[arg(long)]
        text: PathBuf,
        /// Output folder.
        #[arg(long)]
        output: PathBuf,
        /// Projection width (default 512).
        #[arg(long)]
        projection_dim: Option<usize>,
        /// Seed for the new projections.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Image and text embeddings of a Hugging Face model folder, as JSON; or
    /// a whole folder of pictures (--images) or file of texts (--texts) into
    /// a safetensors file for `search` (resumable: rerun after a kill).
    Embed {
        /// Model folder (config.json, model.safetensors, tokenizer.json, processor config).
        #[arg(long)]
        model: PathBuf,
        /// An image file to embed (repeatable).
        #[arg(long)]
        image: Vec<PathBuf>,
        /// A text to embed (repeatable).
        #[arg(long)]
        text: Vec<String>,
        /// Write the JSON here instead of stdout (with --images / --texts:
        /// the safetensors file, required).
        #[arg(long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        collection: clip_wgpu::index::cli::EmbedArgs,
    },
    /// Zero-shot classification of an ImageFolder (one sub-folder per class)
    /// as CLIP_benchmark and OpenCLIP compute it: top-1, top-5, mean
    /// per-class recall, the worst classes' confusions, per-picture predictions.
    #[command(name = "zero-shot", alias = "zero_shot")]
    ZeroShot {
        /// Model folder (config.json, model.safetensors, tokenizer.json, processor config).
        #[arg(long)]
        model: PathBuf,
        /// ImageFolder: one sub-folder of pictures per class (searched recursively).
        #[arg(long)]
        data: PathBuf,
        /// Class names: a JSON object {"folder": "name"} or lines `folder<TAB>name`;
        /// unlisted folders are named by their folder name with `_` as spaces.
        #[arg(long)]
        classes: Option<PathBuf>,
        /// Prompt templates: openai (OpenAI's 80 ImageNet templates), simple (7),
        /// or a file with one template a line, `{c}` for the class name.
        #[arg(long, default_value = "openai")]
        templates: String,
        /// Write the JSON report here (`-`: stdout, the summary then goes to stderr).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Pictures (and prompts) per forward pass.
        #[arg(long = "batch_size", alias = "batch-size", default_value_t = 64)]
        batch_size: usize,
        /// Picture decoding threads (default: the CPU count, at most 8).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// The entries of an embeddings file (`embed --images/--texts`) most
    /// similar to a text or a picture, ranked on the GPU.
    Search(clip_wgpu::index::cli::SearchArgs),
    /// Time each kernel at the shapes of a training step (median of runs),
    /// then whole training steps.
    Bench {
        /// Model: tiny (the demo model), b32 (ViT-B/32's architecture),
        /// clip-roberta (ViT-B/32 vision + roberta-base text, run_clip.py's
        /// model), or a model folder / config.json.
        #[arg(long, default_value = "tiny")]
        config: String,
        /// Batch size of the training-step shapes.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Timed runs per kernel (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Skip the kernel table (whole steps only).
        #[arg(long, alias = "step_only")]
        step_only: bool,
        /// Force the matmul kernel: regs, vec4, tiled, blocked or coop (env
        /// CLIP_WGPU_MATMUL; coop: cooperative matrices with f16 operands,
        /// where the adapter has them);
        /// default: measured per adapter and shape (autotuned, cached).
        #[arg(long)]
        matmul: Option<String>,
        /// Force the vec4 matmul's register tile, e.g. 16x2, or its subgroup
        /// version, e.g. sg16x2 (env CLIP_WGPU_VEC4_TILE).
        #[arg(long)]
        tile: Option<String>,
        /// Force the blocked (GPU) matmul's block BMxBNxBK/TMxTN, e.g.
        /// 64x64x16/4x4 (env CLIP_WGPU_MATMUL_BLOCK).
        #[arg(long)]
        block: Option<String>,
        /// Micro-batches of --batch per step (train's
        /// --gradient_accumulation_steps).
        #[arg(long, default_value_t = 1)]
        accum: usize,
        /// With --accum: full (one contrastive loss over every pair, the
        /// default) or micro (a loss per micro-batch).
        #[arg(long, alias = "accumulation_loss", default_value = "full")]
        accumulation_loss: String,
        /// Recompute each encoder layer's activations in the backward.
        #[arg(long, alias = "gradient_checkpointing")]
        gradient_checkpointing: bool,
        /// Activations in IEEE half precision (f32 arithmetic, master
        /// weights and optimizer state), as `train --fp16`.
        #[arg(long, conflicts_with = "bf16")]
        fp16: bool,
        /// Activations in bfloat16, as `train --bf16`.
        #[arg(long)]
        bf16: bool,
        /// Only the contrastive loss (forward + backward) over this many
        /// pairs, with the config's projection size: its time and memory
        /// (the part of an accumulated step that grows with the batch).
        #[arg(long, alias = "loss_rows")]
        loss_rows: Option<usize>,
    },
}

fn main() {
    steady_malloc();
    quiet_headless_probe();
    let world = match world() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let code = match run(&world) {
        Ok(()) => 0,
        // SIGINT / SIGTERM during training: a checkpoint was saved; exit as a
        // signal-ended process would (130, 143) so that scripts and job
        // schedulers see the run as not finished.
        Err(e) => match e.downcast_ref::<clip_wgpu::train::trainer::Interrupted>() {
            Some(i) => {
                if world.is_main() {
                    clip_wgpu::stderr_line(&format!("[clip-wgpu] {i}"));
                }
                i.exit_code()
            }
            None if world.is_distributed() => {
                // One rank's failure ends the job (MPI_Abort): the others
                // would otherwise wait for it in their next collective.
                clip_wgpu::stderr_line(&format!(
                    "error on rank {} of {}: {e:#}",
                    world.rank(),
                    world.size()
                ));
                world.abort(1)
            }
            None => {
                eprintln!("error: {e:#}");
                1
            }
        },
    };
    drop(world);
    std::process::exit(code);
}

/// This process's place in a data-parallel job: started by mpirun (or
/// another MPI launcher) with the `mpi` feature, a rank of the job;
/// otherwise a world of one.
fn world() -> Result<clip_wgpu::dist::World> {
    #[cfg(feature = "mpi")]
    {
        let launched = [
            "OMPI_COMM_WORLD_SIZE",
            "PMI_SIZE",
            "PMIX_RANK",
            "MPI_LOCALNRANKS",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
        if launched {
            return clip_wgpu::dist::mpi::init();
        }
    }
    Ok(clip_wgpu::dist::World::single())
}

fn run(world: &clip_wgpu::dist::World) -> Result<()> {
    let cli = Cli::parse();
    let req = AdapterRequest {
        backend: cli.backend,
        index: cli.adapter,
    }
    .with_env()?;
    match cli.cmd {
        Cmd::Info => info(&req),
        Cmd::Train { args } => train(req, &args, false, world),
        Cmd::Eval { args } => train(req, &args, true, world),
        Cmd::PrepareDualEncoder {
            vision,
            text,
            output,
            projection_dim,
            seed,
        } => clip_wgpu::model::prepare::prepare_dual_encoder(
            &vision,
            &text,
            &output,
            projection_dim,
            seed,
        ),
        Cmd::Embed {
            model,
            image,
            text,
            output,
            collection,
        } if collection.given() => {
            anyhow::ensure!(
                image.is_empty() && text.is_empty(),
                "--image/--text embed single inputs (JSON), --images/--texts a whole collection: give one or the other"
            );
            let gpu = clip_wgpu::Gpu::new(&req)?;
            clip_wgpu::index::cli::embed(&gpu, model, output, collection)
        }
        Cmd::Search(a) => clip_wgpu::index::cli::search(&clip_wgpu::Gpu::new(&req)?, a),
        Cmd::Embed {
            model,
            image,
            text,
            output,
            ..
        } => {
            anyhow::ensure!(
                !image.is_empty() || !text.is_empty(),
                "nothing to embed: give at least one --image or --text"
            );
            let gpu = clip_wgpu::Gpu::new(&req)?;
            let json = clip_wgpu::embed::embed(&gpu, &model, &image, &text)?.to_json();
            match output {
                Some(p) => clip_wgpu::model::weights::write_atomic(&p, json.as_bytes())?,
                None => println!("{json}"),
            }
            Ok(())
        }
        Cmd::ZeroShot {
            model,
            data,
            classes,
            templates,
            output,
            batch_size,
            workers,
        } => zero_shot(
            &req,
            clip_wgpu::zeroshot::Options {
                model,
                data,
                classes,
                templates,
                batch_size,
                workers: workers
                    .unwrap_or_else(|| clip_wgpu::data::loader::LoaderConfig::default().workers),
                progress: true,
            },
            output,
        ),
        Cmd::Bench {
            config,
            batch,
            reps,
            json,
            step_only,
            matmul,
            tile,
            block,
            accum,
            accumulation_loss,
            gradient_checkpointing,
            fp16,
            bf16,
            loss_rows,
        } => {
            let settings = forced_kernels(matmul, tile, block)?;
            if let Some(n) = loss_rows {
                anyhow::ensure!(n > 0, "--loss-rows must be at least 1");
                let e = clip_wgpu::bench::bench_config(&config)?.projection_dim;
                let gpu = clip_wgpu::Gpu::with_settings(&req, settings)?;
                let (ms, live) = clip_wgpu::bench::contrastive_loss(&gpu, n, e, reps)?;
                let mib = live as f64 / 1048576.0;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"contrastive_loss_rows": n, "dim": e, "median_ms": ms, "live_peak_mib": mib})
                    );
                } else {
                    println!(
                        "contrastive loss over {n} x {n} pairs ({config}: {e}-dim embeddings), forward + backward: \
                         {ms:.1} ms, {mib:.1} MiB in use at most (embeddings included)"
                    );
                }
                return Ok(());
            }
            anyhow::ensure!(accum > 0, "--accum must be at least 1");
            let mode = clip_wgpu::bench::StepMode {
                accum,
                loss: clip_wgpu::train::accumulate::AccumulationLoss::parse(&accumulation_loss)
                    .map_err(|e| anyhow::anyhow!("--accumulation-loss: {e}"))?,
                gradient_checkpointing,
                precision: match (fp16, bf16) {
                    (true, _) => clip_wgpu::precision::Precision::F16,
                    (_, true) => clip_wgpu::precision::Precision::Bf16,
                    _ => clip_wgpu::precision::Precision::F32,
                },
            };
            bench(&req, settings, &config, batch, reps, json, step_only, mode)
        }
    }
}

fn zero_shot(
    req: &AdapterRequest,
    opts: clip_wgpu::zeroshot::Options,
    output: Option<PathBuf>,
) -> Result<()> {
    let gpu = clip_wgpu::Gpu::new(req)?;
    let zs = clip_wgpu::zeroshot::run(&gpu, &opts)?;
    let summary = zs.summary();
    let to_stdout = output.as_deref() == Some(std::path::Path::new("-"));
    match &output {
        Some(_) if to_stdout => {
            eprintln!("{summary}");
            println!("{}", zs.to_json(&opts.model, &opts.data));
        }
        Some(p) => {
            let json = serde_json::to_string_pretty(&zs.to_json(&opts.model, &opts.data))?;
            clip_wgpu::model::weights::write_atomic(p, json.as_bytes())?;
            println!("{summary}\nreport: {}", p.display());
        }
        None => println!("{summary}"),
    }
    Ok(())
}

fn train(
    mut req: AdapterRequest,
    argv: &[String],
    eval_only: bool,
    world: &clip_wgpu::dist::World,
) -> Result<()> {
    use clip_wgpu::train::args;
    if args::wants_help(argv) {
        println!("{}", args::usage());
        return Ok(());
    }
    let mut argv = argv.to_vec();
    if eval_only {
        argv.push("--do_eval".into());
    }
    let (mut targs, notes) = args::parse(&argv)?;
    if eval_only {
        targs.do_train = false;
    }
    for n in &notes {
        eprintln!("[clip-wgpu] note: {n}");
    }
    if targs.backend.is_some() {
        req.backend = targs.backend.clone();
    }
    if targs.adapter.is_some() {
        req.index = targs.adapter;
    }
    if !eval_only {
        clip_wgpu::train::trainer::catch_interrupts();
    }
    let mut who = String::new();
    if world.is_distributed() {
        // One adapter per rank on a machine, unless --adapter or
        // CLIP_WGPU_ADAPTER names one.
        if req.index.is_none() {
            req.index = Some(adapter::index_for_local_rank(&req, world.local_rank())?);
        }
        who = format!(
            "rank {} of {} (local rank {}, pid {}): ",
            world.rank(),
            world.size(),
            world.local_rank(),
            std::process::id()
        );
    }
    let gpu = clip_wgpu::Gpu::new(&req)?;
    clip_wgpu::stderr_line(&format!(
        "[clip-wgpu] {who}adapter: {} ({:?}, {:?})",
        gpu.info.name, gpu.info.backend, gpu.info.device_type
    ));
    let all = clip_wgpu::train::trainer::run_on(&targs, &gpu, world)?;
    if world.is_main() {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

/// The environment's settings with `--matmul` / `--tile` / `--block`
/// (checked) in place of CLIP_WGPU_MATMUL / CLIP_WGPU_VEC4_TILE /
/// CLIP_WGPU_MATMUL_BLOCK.
fn forced_kernels(
    matmul: Option<String>,
    tile: Option<String>,
    block: Option<String>,
) -> Result<Settings> {
    let mut settings = Settings::from_env()?;
    if let Some(m) = matmul {
        settings.matmul = Some(clip_wgpu::ops::matmul::Variant::parse(&m).ok_or_else(|| {
            anyhow::anyhow!("--matmul {m:?}: expected regs, vec4, tiled, blocked or coop")
        })?);
    }
    if let Some(t) = tile {
        use clip_wgpu::ops::matmul::{parse_tile, tile_name, SG_TILES, VEC4_TILES};
        let names: Vec<String> = VEC4_TILES
            .iter()
            .chain(&SG_TILES)
            .map(|t| tile_name(*t))
            .collect();
        settings.vec4_tile = Some(parse_tile(&t).ok_or_else(|| {
            anyhow::anyhow!("--tile {t:?}: expected one of {}", names.join(", "))
        })?);
    }
    if let Some(b) = block {
        use clip_wgpu::ops::matmul::{Block, BLOCKS};
        settings.block = Some(Block::parse(&b).ok_or_else(|| {
            let names: Vec<String> = BLOCKS.iter().map(|b| b.to_string()).collect();
            anyhow::anyhow!(
                "--block {b:?}: expected BMxBNxBK/TMxTN, e.g. one of {}",
                names.join(", ")
            )
        })?);
    }
    Ok(settings)
}

#[allow(clippy::too_many_arguments)]
fn bench(
    req: &AdapterRequest,
    settings: Settings,
    config: &str,
    batch: usize,
    reps: usize,
    json: bool,
    step_only: bool,
    mode: clip_wgpu::bench::StepMode,
) -> Result<()> {
    use clip_wgpu::bench;
    anyhow::ensure!(batch > 0, "--batch must be at least 1");
    anyhow::ensure!(reps > 0, "--reps must be at least 1");
    let cfg = bench::bench_config(config)?;
    let gpu = clip_wgpu::Gpu::with_settings(req, settings)?;
    if !json {
        println!(
            "adapter: {} ({:?}, {:?}); kernel times from {}; config {config}, batch {batch}",
            gpu.info.name,
            gpu.info.backend,
            gpu.info.device_type,
            if gpu.has_timestamps() {
                "GPU timestamp queries"
            } else {
                "wall time around submit + wait"
            }
        );
        if let Some(p) = gpu.tune_cache_path() {
            println!("matmul choices cached in {}", p.display());
        }
    }
    if !step_only {
        let rows = bench::kernel_table(&gpu, &cfg, batch, reps, mode.precision)?;
        if json {
            for m in &rows {
                println!("{}", m.json());
            }
        } else {
            bench::print_table(&rows);
        }
    }
    let st = bench::training_step(&gpu, cfg, batch, reps, mode)?;
    let rss = bench::peak_rss_mib();
    let accum = mode.accum;
    if json {
        let kernels: Vec<_> = st
            .kernels
            .iter()
            .map(|k| serde_json::json!({"kernel": k.kernel, "calls": k.calls, "ms": k.seconds * 1e3}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "step": config, "batch": batch, "accum": accum,
                "accumulation_loss": mode.loss.as_str(),
                "gradient_checkpointing": mode.gradient_checkpointing,
                "precision": mode.precision.name(),
                "forward_ms": st.forward_ms,
                "backward_ms": st.backward_ms, "optimizer_ms": st.optimizer_ms,
                "step_ms": st.forward_ms + st.backward_ms + st.optimizer_ms,
                "images_per_s": st.images_per_s, "peak_pool_mib": st.peak_pool_mib,
                "live_peak_mib": st.live_peak_mib, "peak_rss_mib": rss,
                "tape_mib": st.tape_mib,
                "allocations_after_first_step": st.allocations_after_first_step,
                "submits_per_step": st.submits_per_step,
                "whole_step_ms": st.step_ms, "whole_step_submits": st.step_submits,
                "text_len": st.text_len, "text_positions_run": st.text_run,
                "kernels": kernels,
            })
        );
    } else {
        let mut how = match (accum, mode.gradient_checkpointing) {
            (1, false) => String::new(),
            (1, true) => ", gradient checkpointing".into(),
            (k, c) => format!(
                " x {k} accumulated ({} loss{})",
                mode.loss.as_str(),
                if c { ", gradient checkpointing" } else { "" }
            ),
        };
        if mode.precision.is_half() {
            how.push_str(&format!(", {} activations", mode.precision.name()));
        }
        let phases = if accum > 1 {
            format!(
                "gradients of {accum} micro-batches {:.1} ms",
                st.backward_ms
            )
        } else {
            format!(
                "forward {:.1} ms, backward {:.1} ms",
                st.forward_ms, st.backward_ms
            )
        };
        println!(
            "\ntraining step, {config} config, batch {batch}{how}: {phases}, AdamW {:.1} ms \
             (step {:.1} ms), {:.1} images/s; buffer pool peak {:.1} MiB (in use at once: {:.1} MiB; \
             kept by the forward for the backward: {:.1} MiB){}; \
             {} buffer allocations after the first step; {:.1} submits per step (waiting after each phase)",
            st.optimizer_ms,
            st.forward_ms + st.backward_ms + st.optimizer_ms,
            st.images_per_s,
            st.peak_pool_mib,
            st.live_peak_mib,
            st.tape_mib,
            rss.map_or(String::new(), |r| format!("; process peak RSS {r:.1} MiB")),
            st.allocations_after_first_step,
            st.submits_per_step
        );
        println!(
            "whole step with no wait between its phases{}: {:.1} ms ({:.1} images/s), {:.1} submits per step",
            if accum > 1 {
                " (each micro-batch submitted as it is recorded)"
            } else {
                ", recorded as one command buffer"
            },
            st.step_ms,
            (batch * accum) as f64 * 1e3 / st.step_ms,
            st.step_submits
        );
        println!(
            "text padded to {} tokens; the text tower runs the first {} (through the last position its \
             output depends on; CLIP_WGPU_FULL_TEXT=1 runs all)",
            st.text_len, st.text_run
        );
        bench::print_kernel_times(&st.kernels, gpu.has_timestamps());
    }
    Ok(())
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
    println!(
        "\ndefault choice: {} ({:?}, {:?})",
        chosen.name, chosen.backend, chosen.device_type
    );
    Ok(())
}

/// glibc's malloc raises its mmap threshold each time a large block is freed,
/// after which big buffers of varied sizes (decoded pictures) come from the
/// heap and fragment it: on real pictures RSS crept up 1.6% over 800 steps
/// (scripts/soak.sh with SOAK_DATA). A fixed 128 KiB threshold (large blocks
/// always go back to the system) and two arenas held it at 0.03%. Left
/// alone when the user tunes malloc through GLIBC_TUNABLES.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn steady_malloc() {
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only sets allocator parameters; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn steady_malloc() {}

/// Mesa's Vulkan device-select layer orders GPUs by the display they drive:
/// it connects to Wayland and X11 while adapters are listed, and on a
/// headless machine libwayland prints `error: XDG_RUNTIME_DIR is invalid or
/// not set` for each probe. With no display at all there is nothing for it
/// to select by (clip-wgpu chooses adapters itself), so it is turned off
/// there, through the switch Mesa's layer manifest names.
fn quiet_headless_probe() {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if cfg!(target_os = "linux")
        && !set("WAYLAND_DISPLAY")
        && !set("DISPLAY")
        && std::env::var_os("NODEVICE_SELECT").is_none()
    {
        // The first thing main does, before any other thread exists.
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}
