//! Every pipeline the project creates translates to each backend's shader
//! language: SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and GLSL (GL). The
//! pipelines are the ones a real device made while running training steps
//! of both model kinds (with the autotuner trying every matmul candidate,
//! and every kernel family forced in turn), each entry point with the
//! override constants it was created with, plus every entry point of every
//! shader at its default constants. A failure names the shader, the entry
//! point, the constants and the target.
//!
//! Subgroup kernels need subgroup operations, which WebGL-class GLSL ES
//! lacks: the host only picks them where the adapter reports subgroups of 8
//! (never on wgpu's GL backend), so for GLSL they are checked to be exactly
//! the pipelines that use subgroups, and skipped.
mod common;
use clip_wgpu::bench::{bench_config, tiny_config, StepBench, StepMode};
use clip_wgpu::gpu::{AdapterRequest, PipelineSpec, Settings};
use clip_wgpu::ops::matmul::{Tile, Variant, BLOCKS};
use clip_wgpu::precision::Precision;
use clip_wgpu::shaders::ALL;
use clip_wgpu::Gpu;
use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use std::collections::{BTreeMap, BTreeSet};

/// The pipelines made by training steps under `settings`.
fn made_by_steps(settings: Settings) -> Vec<PipelineSpec> {
    let req = AdapterRequest::default().with_env().unwrap();
    let gpu = Gpu::with_settings(&req, settings).unwrap();
    // The aligned RoBERTa fixture's config with room for the step's token
    // ids (up to 40,000).
    let f = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/clip_roberta_aligned/model/config.json"
    );
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
    cfg["text_config"]["vocab_size"] = 50265.into();
    let dir = common::cli::temp("naga-roberta");
    let roberta = dir.join("config.json");
    std::fs::write(&roberta, cfg.to_string()).unwrap();
    for config in [
        tiny_config(),
        bench_config(roberta.to_str().unwrap()).unwrap(),
    ] {
        let mut step = StepBench::new(&gpu, config, 2).unwrap();
        step.run().unwrap();
    }
    // A --bf16 and an --fp16 step of the tiny config: the 16-bit
    // conversions and the half-precision paths' kernels.
    for precision in [Precision::Bf16, Precision::F16] {
        let mode = StepMode {
            precision,
            ..StepMode::default()
        };
        let mut step = StepBench::with_mode(&gpu, tiny_config(), 2, mode).unwrap();
        step.run().unwrap();
    }
    gpu.pipelines_made()
}

fn uses_subgroups(src: &str) -> bool {
    src.contains("subgroup")
}

/// Translate one pipeline to every target; the errors, one per target.
fn translate(spec: &PipelineSpec) -> Vec<String> {
    let what = format!("{}::{} {:?}", spec.shader, spec.entry, spec.constants);
    let module = naga::front::wgsl::parse_str(spec.source)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(spec.source)));
    // Cooperative matrices exist on wgpu's Vulkan and Metal backends only
    // (the host uses them only where the adapter reports them).
    let coop = spec.source.contains("enable wgpu_cooperative_matrix;");
    let mut caps = if uses_subgroups(spec.source) {
        Capabilities::SUBGROUP
    } else {
        Capabilities::empty()
    };
    if coop {
        caps |= Capabilities::COOPERATIVE_MATRIX | Capabilities::SHADER_FLOAT16;
    }
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(spec.source)));
    let constants: naga::back::PipelineConstants = spec.constants.iter().cloned().collect();
    let stage = naga::ShaderStage::Compute;
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((stage, &spec.entry)),
        &constants,
    )
    .unwrap_or_else(|e| panic!("{what}: override constants: {e}"));
    let mut errors = Vec::new();

    let spv_pipe = spv::PipelineOptions {
        shader_stage: stage,
        entry_point: spec.entry.clone(),
    };
    let spv_opts = spv::Options {
        lang_version: (1, 3),
        ..spv::Options::default()
    };
    if let Err(e) = spv::write_vec(&module, &info, &spv_opts, Some(&spv_pipe)) {
        errors.push(format!("{what} -> SPIR-V: {e}"));
    }

    let msl_opts = msl::Options {
        lang_version: (2, 4),
        ..msl::Options::default()
    };
    let msl_pipe = msl::PipelineOptions {
        entry_point: Some((stage, spec.entry.clone())),
        ..msl::PipelineOptions::default()
    };
    if let Err(e) = msl::write_string(&module, &info, &msl_opts, &msl_pipe) {
        errors.push(format!("{what} -> MSL: {e}"));
    }

    if coop {
        return errors;
    }
    let hlsl_opts = hlsl::Options {
        shader_model: hlsl::ShaderModel::V6_0,
        ..hlsl::Options::default()
    };
    let hlsl_pipe = hlsl::PipelineOptions {
        entry_point: Some((stage, spec.entry.clone())),
    };
    let mut out = String::new();
    let mut w = hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe);
    if let Err(e) = w.write(&module, &info, None) {
        errors.push(format!("{what} -> HLSL: {e}"));
    }

    if !uses_subgroups(spec.source) {
        let glsl_opts = glsl::Options {
            version: glsl::Version::new_gles(310),
            ..glsl::Options::default()
        };
        let glsl_pipe = glsl::PipelineOptions {
            shader_stage: stage,
            entry_point: spec.entry.clone(),
            multiview: None,
        };
        let mut out = String::new();
        let r = glsl::Writer::new(
            &mut out,
            &module,
            &info,
            &glsl_opts,
            &glsl_pipe,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write());
        if let Err(e) = r {
            errors.push(format!("{what} -> GLSL: {e}"));
        }
    }
    errors
}

#[test]
fn every_pipeline_translates_to_every_backend() {
    if common::gpu().is_none() {
        return;
    }
    // Tuning in memory only, so every candidate kernel is made; then each
    // family forced.
    let mut specs = made_by_steps(Settings::default());
    let forced = [
        Settings {
            matmul: Some(Variant::Regs),
            ..Settings::default()
        },
        Settings {
            matmul: Some(Variant::Tiled),
            ..Settings::default()
        },
        Settings {
            matmul: Some(Variant::Blocked),
            ..Settings::default()
        },
        Settings {
            matmul: Some(Variant::Vec4),
            vec4_tile: Some(Tile {
                rm: 16,
                rv: 2,
                sg: false,
            }),
            ..Settings::default()
        },
        Settings {
            attention: Some(clip_wgpu::gpu::settings::Attention::Unfused),
            ..Settings::default()
        },
        Settings {
            attention: Some(clip_wgpu::gpu::settings::Attention::Tiled),
            ..Settings::default()
        },
    ];
    for s in forced {
        specs.extend(made_by_steps(s));
    }
    // Every entry point of every shader at its default constants.
    for (name, src) in ALL {
        let module = naga::front::wgsl::parse_str(src).unwrap();
        for ep in &module.entry_points {
            specs.push(PipelineSpec {
                shader: name,
                source: src,
                entry: ep.name.clone(),
                constants: Vec::new(),
            });
        }
    }
    // Every block of the GPU matmul (a CPU adapter may not fit them all),
    // in each transpose form, with the epilogues' constants.
    let blocked = ALL.iter().find(|(n, _)| *n == "matmul_blocked").unwrap();
    for b in BLOCKS {
        for (ta, tb, epilogue) in [
            (0, 0, [("HAS_BIAS", 1), ("ACT", 1), ("ACT_KIND", 1)]),
            (0, 1, [("ACCUMULATE", 1), ("ACT", 2), ("ACT_KIND", 2)]),
            (1, 0, [("BIAS_GRAD", 1), ("ACT", 0), ("ACT_KIND", 0)]),
            (1, 1, [("ACCUMULATE", 1), ("HAS_BIAS", 1), ("ACT", 0)]),
        ] {
            let mut constants: Vec<(String, f64)> = [
                ("TRANS_A", ta),
                ("TRANS_B", tb),
                ("BM", b.bm),
                ("BN", b.bn),
                ("BK", b.bk),
                ("TM", b.tm),
                ("TN", b.tn),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), *v as f64))
            .collect();
            constants.extend(epilogue.iter().map(|(k, v)| (k.to_string(), *v as f64)));
            specs.push(PipelineSpec {
                shader: blocked.0,
                source: blocked.1,
                entry: "matmul_blocked".into(),
                constants,
            });
        }
    }
    // The cooperative-matrix matmuls (no adapter here has them) in each
    // transpose form, with the epilogues, at the subgroup sizes of NVIDIA
    // and AMD GPUs and Apple's.
    for shader in ["matmul_coop8", "matmul_coop16"] {
        let (name, source) = ALL.iter().find(|(n, _)| *n == shader).unwrap();
        for wg in [32, 64] {
            for (ta, tb, epilogue) in [
                (0, 0, [("HAS_BIAS", 1), ("ACT", 1), ("ACT_KIND", 1)]),
                (0, 1, [("ACCUMULATE", 1), ("ACT", 2), ("ACT_KIND", 2)]),
                (1, 0, [("HAS_BIAS", 0), ("ACT", 0), ("ACT_KIND", 0)]),
                (1, 1, [("ACCUMULATE", 1), ("HAS_BIAS", 1), ("ACT", 0)]),
            ] {
                let mut constants: Vec<(String, f64)> =
                    vec![("WG".into(), wg as f64), ("TRANS_A".into(), ta as f64)];
                constants.push(("TRANS_B".into(), tb as f64));
                constants.extend(epilogue.iter().map(|(k, v)| (k.to_string(), *v as f64)));
                specs.push(PipelineSpec {
                    shader: name,
                    source,
                    entry: "matmul_coop".into(),
                    constants,
                });
            }
        }
    }
    // The tiled attention at every workgroup size and some head sizes.
    let tiled = ALL.iter().find(|(n, _)| *n == "attention_tiled").unwrap();
    for rows in clip_wgpu::ops::attention_fused::TILED_ROWS {
        for dh in [16, 32, 64, 128] {
            for entry in ["attn_fwd_wg", "attn_dq_wg", "attn_dkv_wg"] {
                specs.push(PipelineSpec {
                    shader: tiled.0,
                    source: tiled.1,
                    entry: entry.into(),
                    constants: vec![("DH4".into(), (dh / 4) as f64), ("BLK".into(), rows as f64)],
                });
            }
        }
    }
    // One translation per distinct pipeline.
    let mut seen = BTreeSet::new();
    specs.retain(|s| seen.insert(format!("{}::{} {:?}", s.shader, s.entry, s.constants)));
    let mut errors = Vec::new();
    let mut per_shader: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &specs {
        errors.extend(translate(s));
        *per_shader.entry(s.shader).or_default() += 1;
    }
    eprintln!(
        "{} pipelines translated to SPIR-V, MSL, HLSL (and GLSL where no subgroups): {per_shader:?}",
        specs.len()
    );
    assert!(
        specs.iter().any(|s| s.shader == "matmul_sg")
            && specs.iter().any(|s| !s.constants.is_empty())
            && specs
                .iter()
                .any(|s| s.shader == "matmul_blocked" && s.constants.len() > 10),
        "the steps made no subgroup or specialised pipeline: the check would be thin"
    );
    assert!(
        errors.is_empty(),
        "{} failures:\n{}",
        errors.len(),
        errors.join("\n")
    );
}
