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
        let ops = operands(unpack, a16, b16);
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
    write(
        "attention_fused.wgsl",
        attention_gen::generate(&attention, false),
    );
    write(
        "attention_sg.wgsl",
        attention_gen::generate(&attention, true),
    );
    // The GPU attention binds as the fused kernels do.
    write(
        "attention_tiled.wgsl",
        template::fill(
            &read("attention_tiled.tmpl.wgsl"),
            &[(
                "COMMON",
                template::shared_block(&attention, "attention_fused.tmpl.wgsl"),
            )],
        ),
    );
}

/// The matmuls' OPERANDS: convert.wgsl's shared block (16-bit decoding
/// and rounding, for packed operands and the ROUND epilogue), then A and B
/// bound as vec4<f32> arrays or (`a16`, `b16`) as packed 16-bit words, and
/// read through ld_a / ld_b either way.
fn operands(unpack: &str, a16: bool, b16: bool) -> String {
    let mut o = String::from(unpack);
    o.push('\n');
    for (binding, name, half) in [(1, "a", a16), (2, "b", b16)] {
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
