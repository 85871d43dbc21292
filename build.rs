//! Writes the unrolled WGSL kernels into OUT_DIR: the CPU-adapter matmul
//! (matmul_vec4.wgsl, matmul_sg.wgsl), the GPU matmuls (matmul_blocked.wgsl
//! and the cooperative-matrix matmul_coop8/16.wgsl, which share their
//! epilogue), fused attention (attention_fused.wgsl,
//! attention_sg.wgsl) and the GPU attention (attention_tiled.wgsl, which
//! shares their bindings). Their hand-written parts are
//! templates in shaders/ (*.tmpl.wgsl); the generators only unroll.
//!
//! Why generated: llvmpipe keeps private arrays in memory and gathers every
//! access unless all indexing is constant, and Mesa does not unroll loops of
//! this size itself.

use std::path::{Path, PathBuf};
use std::{env, fs};

/// Appends one formatted line (writing into a String cannot fail).
macro_rules! w {
    ($o:expr, $($fmt:tt)*) => {
        writeln!($o, $($fmt)*).unwrap()
    };
}

#[path = "build/attention_gen.rs"]
mod attention_gen;
#[path = "build/matmul_gen.rs"]
mod matmul_gen;
#[path = "build/template.rs"]
mod template;

fn main() {
    let shaders = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // The generators themselves are part of this build script, so cargo
    // reruns it when they change; the shader inputs are declared here.
    let read = |name: &str| {
        let path = shaders.join(name);
        println!("cargo:rerun-if-changed={}", path.display());
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let write = |name: &str, text: String| {
        let path = out.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    };

    let matmul = read("matmul_vec4.tmpl.wgsl");
    let activation = read("activation.wgsl");
    let activation = template::shared_block(&activation, "activation.wgsl");
    let convert = read("convert.wgsl");
    let unpack = template::shared_block(&convert, "convert.wgsl");
    let coop = read("matmul_coop.tmpl.wgsl");
    // Each matmul in three operand layouts: f32 A and B; f32 A, 16-bit B
    // (the backward's dY times a kept activation or weight); both 16-bit
    // (a half-precision forward). The cooperative-matrix kernel, whose
    // products are f16, only in the first and last.
    for (suffix, a16, b16) in [
        ("", false, false),
        ("_b16", false, true),
        ("_ab16", true, true),
    ] {
        // The shared block always: the ROUND epilogue rounds with it.
        let ops = bindings(unpack, true, &[(1, "a", a16), (2, "b", b16)]);
        write(
            &format!("matmul_vec4{suffix}.wgsl"),
            matmul_gen::generate(&matmul, activation, &ops, false),
        );
        write(
            &format!("matmul_sg{suffix}.wgsl"),
            matmul_gen::generate(&matmul, activation, &ops, true),
        );
        // The GPU matmul shares the vec4 kernels' bindings and epilogue.
        let common = template::fill(
            template::shared_block(&matmul, "matmul_vec4.tmpl.wgsl"),
            &[("ACTIVATION", activation), ("OPERANDS", &ops)],
        );
        write(
            &format!("matmul_blocked{suffix}.wgsl"),
            template::fill(&read("matmul_blocked.tmpl.wgsl"), &[("COMMON", &common)]),
        );
        if a16 != b16 {
            continue;
        }
        // The cooperative-matrix matmul, in the two sizes adapters offer (8:
        // Apple's simdgroup matrices; 16: Vulkan's tensor cores).
        for size in ["8", "16"] {
            write(
                &format!("matmul_coop{size}{suffix}.wgsl"),
                template::fill(&coop, &[("S", size), ("COMMON", &common)]),
            );
        }
    }

    let attention = read("attention_fused.tmpl.wgsl");
    let tiled = read("attention_tiled.tmpl.wgsl");
    // Attention with q, k and v in f32, and packed 16-bit (the half modes).
    for (suffix, half) in [("", false), ("_h16", true)] {
        let qkv = bindings(
            unpack,
            half,
            &[(1, "q", half), (2, "k", half), (3, "v", half)],
        );
        write(
            &format!("attention_fused{suffix}.wgsl"),
            attention_gen::generate(&attention, &qkv, false),
        );
        write(
            &format!("attention_sg{suffix}.wgsl"),
            attention_gen::generate(&attention, &qkv, true),
        );
        // The GPU attention binds as the fused kernels do.
        let common = template::fill(
            template::shared_block(&attention, "attention_fused.tmpl.wgsl"),
            &[("QKV", &qkv)],
        );
        write(
            &format!("attention_tiled{suffix}.wgsl"),
            template::fill(&tiled, &[("COMMON", &common)]),
        );
    }
}

/// Storage bindings read through `ld_NAME(i)` (vec4 i of the array):
/// vec4<f32> arrays, or (`half`) packed 16-bit words that convert.wgsl's
/// shared block (`unpack`, put first when `with_unpack`) decodes. The
/// matmuls' OPERANDS (A, B) and attention's QKV (q, k, v).
fn bindings(unpack: &str, with_unpack: bool, list: &[(u32, &str, bool)]) -> String {
    let mut o = String::new();
    if with_unpack {
        o.push_str(unpack);
        o.push('\n');
    }
    for &(binding, name, half) in list {
        let (ty, load) = if half {
            ("vec2<u32>", format!("unpack4({name}[i])"))
        } else {
            ("vec4<f32>", format!("{name}[i]"))
        };
        o.push_str(&format!(
            "@group(0) @binding({binding}) var<storage, read> {name}: array<{ty}>;\n\
             fn ld_{name}(i: u32) -> vec4<f32> {{ return {load}; }}\n"
        ));
    }
    o.trim_end().to_string()
}
