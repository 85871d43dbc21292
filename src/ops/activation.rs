//! Pointwise activations of the CLIP towers: exact GELU (RoBERTa "gelu"),
//! QuickGELU (OpenAI CLIP "quick_gelu"), tanh (RoBERTa pooler) and the
//! tanh-approximated GELU. The backward recomputes from the saved input.

use super::{by_vec4, shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};

const SHADER: Shader = shader!("activation");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// x * Phi(x) with the exact normal CDF (PyTorch nn.GELU()).
    Gelu,
    /// x * sigmoid(1.702 x).
    QuickGelu,
    Tanh,
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (nn.GELU("tanh")).
    GeluTanh,
}

impl Act {
    /// The activation a Hugging Face config's `hidden_act` names.
    pub fn from_hf(name: &str) -> Result<Act> {
        Ok(match name {
            "gelu" | "gelu_python" => Act::Gelu,
            "quick_gelu" => Act::QuickGelu,
            "tanh" => Act::Tanh,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            other => bail!(
                "unsupported activation hidden_act={other:?}: expected gelu, quick_gelu, tanh, \
                 gelu_new or gelu_pytorch_tanh"
            ),
        })
    }

    pub(crate) fn code(self) -> u32 {
        match self {
            Act::Gelu => 0,
            Act::QuickGelu => 1,
            Act::Tanh => 2,
            Act::GeluTanh => 3,
        }
    }
}

/// y = a(x), same shape.
pub fn forward(x: &Tensor, a: Act) -> Result<Tensor> {
    let y = Tensor::empty(x.gpu(), x.shape())?;
    forward_into(x, &y, a)?;
    Ok(y)
}

/// `forward` into an existing tensor of x's size.
pub fn forward_into(x: &Tensor, y: &Tensor, a: Act) -> Result<()> {
    let gpu = x.gpu();
    let n = x.numel();
    ensure!(
        y.numel() == n,
        "activation: output {:?} does not match {:?}",
        y.shape(),
        x.shape()
    );
    let (entry, w) = by_vec4(n.is_multiple_of(4), "forward");
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(n), a.code(), 0, 0],
        &[Some(x.buffer()), Some(y.buffer())],
        gpu.grid_1d(n / w, 256),
    )
}

/// dx = dy * a'(x).
pub fn backward(x: &Tensor, dy: &Tensor, a: Act) -> Result<Tensor> {
    ensure!(
        x.numel() == dy.numel(),
        "activation backward: dy {:?} does not match x {:?}",
        dy.shape(),
        x.shape()
    );
    let gpu = x.gpu();
    let n = x.numel();
    let dx = Tensor::empty(gpu, x.shape())?;
    let (entry, w) = by_vec4(n.is_multiple_of(4), "backward");
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(n), a.code(), 0, 0],
        &[Some(x.buffer()), Some(dx.buffer()), Some(dy.buffer())],
        gpu.grid_1d(n / w, 256),
    )?;
    Ok(dx)
}

/// Tape op: y = a(x); saves x.
pub fn act(tape: &mut Tape, x: &Var, a: Act) -> Result<Var> {
    let y = forward(x.tensor(), a)?;
    let xs = x.tensor().clone();
    Ok(tape.record(
        y,
        &[x],
        Box::new(move |dy, _| Ok(vec![Some(backward(&xs, dy, a)?)])),
    ))
}

/// erf in f64 to a few ulp.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 1.0 {
        erf_series(a)
    } else {
        1.0 - erfc_cf(a)
    };
    r.copysign(x)
}

/// erfc in f64, accurate in relative terms in the right tail.
pub fn erfc(x: f64) -> f64 {
    if x < 1.0 {
        1.0 - erf(x)
    } else {
        erfc_cf(x)
    }
}

/// erf(a) = 2/sqrt(pi) e^{-a^2} sum_n a (2a^2)^n / (2n+1)!!: positive terms,
/// no cancellation.
fn erf_series(a: f64) -> f64 {
    let z = 2.0 * a * a;
    let (mut term, mut sum) = (a, a);
    let mut n = 0.0;
    while term > sum * 1e-18 {
        n += 1.0;
        term *= z / (2.0 * n + 1.0);
        sum += term;
    }
    sum * (-a * a).exp() * std::f64::consts::FRAC_2_SQRT_PI
}

/// erfc(a) = e^{-a^2} / sqrt(pi) / (a + (1/2) / (a + 1 / (a + (3/2) / (a + ...)))),
/// evaluated from the tail; 400 terms reach f64 precision for a >= 1.
fn erfc_cf(a: f64) -> f64 {
    if a > 27.0 {
        return 0.0; // underflows
    }
    let mut f = a;
    for n in (1..=400).rev() {
        f = a + (n as f64 / 2.0) / f;
    }
    (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Phi(x) = erfc(-x / sqrt 2) / 2, accurate in the left tail.
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

fn tanh_gelu_inner(x: f64) -> (f64, f64) {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    (
        k * (x + 0.044715 * x * x * x),
        k * (1.0 + 3.0 * 0.044715 * x * x),
    )
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn act1(x: f64, a: Act) -> f64 {
    match a {
        Act::Gelu => x * normal_cdf(x),
        Act::QuickGelu => x * sigmoid(1.702 * x),
        Act::Tanh => x.tanh(),
        Act::GeluTanh => 0.5 * x * (1.0 + tanh_gelu_inner(x).0.tanh()),
    }
}

fn grad1(x: f64, a: Act) -> f64 {
    match a {
        Act::Gelu => normal_cdf(x) + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp(),
        Act::QuickGelu => {
            let s = sigmoid(1.702 * x);
            s + 1.702 * x * s * (1.0 - s)
        }
        Act::Tanh => 1.0 - x.tanh().powi(2),
        Act::GeluTanh => {
            let (u, du) = tanh_gelu_inner(x);
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
        }
    }
}

pub fn act_ref(x: &[f64], a: Act) -> Vec<f64> {
    x.iter().map(|&v| act1(v, a)).collect()
}

pub fn act_backward_ref(x: &[f64], dy: &[f64], a: Act) -> Vec<f64> {
    x.iter().zip(dy).map(|(&v, &d)| d * grad1(v, a)).collect()
}
