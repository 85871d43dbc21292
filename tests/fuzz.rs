//! Bounded randomized ("fuzz") tests of the parsers that read files from
//! users: model config.json, safetensors (and sharded indexes), COCO
//! captions, CSV / JSON-lines tables, image processor configs and image
//! decoding. Each target mutates the committed fixtures (byte flips,
//! truncations, spliced tokens, random JSON values at random keys) with a
//! seeded generator and checks that the reader never panics, that every
//! error has a message, and that what it accepts is consistent.
//!
//! Environment: `CLIP_WGPU_FUZZ_ITERS` (iterations per target; the defaults
//! take a few seconds per target in a debug build), `CLIP_WGPU_FUZZ_SEED`
//! (default fixed, so a plain `cargo test` is reproducible),
//! `CLIP_WGPU_FUZZ_SECS` (stop each target after this many seconds),
//! `CLIP_WGPU_FUZZ_START` (first iteration: iteration N depends only on the
//! seed and N, so a failure replays with START=N and ITERS=1),
//! `CLIP_WGPU_FUZZ_VERBOSE` (list the kinds of error each target met, to
//! see how deep the mutations reach). A failing input is written to
//! `target/fuzz-failures/` and the message gives the seed and iteration.
//! `scripts/fuzz.sh` runs them long.
mod common;
use clip_wgpu::data::image::{decode_image, preprocess, ImageProcessorConfig};
use clip_wgpu::data::sources::{self, mix64, parse_csv, Split, SplitMix64};
use clip_wgpu::model::clip::ClipModel;
use clip_wgpu::model::config::ModelConfig;
use clip_wgpu::model::weights::{save_file, Weights};
use common::cli::temp;
use common::fixtures;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- driver

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    };
    Some(parsed.unwrap_or_else(|| panic!("{name}={v:?} is not a number")))
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// One fuzz target's run: seed, iteration budget, time budget.
struct Fuzz {
    name: &'static str,
    seed: u64,
    iters: u64,
    deadline: Option<Instant>,
    /// With CLIP_WGPU_FUZZ_VERBOSE: how often each kind of error came up
    /// (the message with digits dropped), to see what the mutations reach.
    errors: Option<std::cell::RefCell<HashMap<String, u64>>>,
}

/// The iteration being run: its generator and what to report on failure.
struct Case<'a> {
    fuzz: &'a Fuzz,
    iter: u64,
    rng: SplitMix64,
}

impl Fuzz {
    fn new(name: &'static str, default_iters: u64) -> Fuzz {
        let seed = env_u64("CLIP_WGPU_FUZZ_SEED").unwrap_or(0x00C1_1B5E_ED00_0001);
        let iters = env_u64("CLIP_WGPU_FUZZ_ITERS").unwrap_or(default_iters);
        let deadline =
            env_u64("CLIP_WGPU_FUZZ_SECS").map(|s| Instant::now() + Duration::from_secs(s));
        let verbose = std::env::var_os("CLIP_WGPU_FUZZ_VERBOSE").is_some();
        Fuzz {
            name,
            seed,
            iters,
            deadline,
            errors: verbose.then(Default::default),
        }
    }

    /// Run `body` once per iteration, each with its own generator
    /// (seeded from the run's seed and the iteration, so a failure can be
    /// replayed alone).
    fn run(&self, mut body: impl FnMut(&mut Case)) {
        let t0 = Instant::now();
        let mut done = 0;
        let start = env_u64("CLIP_WGPU_FUZZ_START").unwrap_or(0);
        for iter in start..start.saturating_add(self.iters) {
            if self.deadline.is_some_and(|d| Instant::now() > d) {
                break;
            }
            let mut case = Case {
                fuzz: self,
                iter,
                rng: SplitMix64(mix64(self.seed ^ mix64(iter.wrapping_add(0x9e37)))),
            };
            body(&mut case);
            done += 1;
        }
        eprintln!(
            "fuzz {}: {done} iterations in {:.2} s (seed {:#x})",
            self.name,
            t0.elapsed().as_secs_f64(),
            self.seed
        );
        if let Some(errors) = &self.errors {
            let mut kinds: Vec<(String, u64)> = errors.borrow().clone().into_iter().collect();
            kinds.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            eprintln!("fuzz {}: {} kinds of error:", self.name, kinds.len());
            for (k, n) in kinds {
                eprintln!("  {n:>8}  {k}");
            }
        }
    }
}

/// An error message with numbers dropped, so that one kind of error counts
/// once.
fn error_kind(msg: &str) -> String {
    msg.chars()
        .filter(|c| !c.is_ascii_digit())
        .map(|c| if c == '\n' { ' ' } else { c })
        .take(140)
        .collect()
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

impl Case<'_> {
    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.unit() < p
    }

    fn pick<'b, T>(&mut self, items: &'b [T]) -> &'b T {
        &items[self.below(items.len())]
    }

    /// Save the input and fail with the seed and iteration.
    fn fail(&self, input: &[u8], what: &str) -> ! {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!(
            "{}-seed{:x}-iter{}.bin",
            self.fuzz.name, self.fuzz.seed, self.iter
        ));
        let _ = std::fs::write(&file, input);
        panic!(
            "fuzz {}: {what}\n  replay: CLIP_WGPU_FUZZ_SEED={:#x}, iteration {}\n  input ({} bytes) saved to {}",
            self.fuzz.name,
            self.fuzz.seed,
            self.iter,
            input.len(),
            file.display()
        );
    }

    /// Run `f`: a panic or an error without a message fails the test
    /// (saving `input`); an error gives None.
    fn guard<T>(&self, input: &[u8], f: impl FnOnce() -> anyhow::Result<T>) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                if msg.trim().is_empty() {
                    self.fail(input, "an error with an empty message");
                }
                if let Some(errors) = &self.fuzz.errors {
                    *errors.borrow_mut().entry(error_kind(&msg)).or_default() += 1;
                }
                None
            }
            Err(p) => self.fail(input, &format!("panicked: {}", panic_text(&*p))),
        }
    }

    /// Check an invariant of an accepted input.
    fn ensure(&self, ok: bool, input: &[u8], what: impl FnOnce() -> String) {
        if !ok {
            self.fail(input, &format!("accepted, but {}", what()));
        }
    }
}

// ---------------------------------------------------------------- mutators

/// Tokens spliced into text inputs: JSON and CSV syntax, odd numbers, odd text.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\"\"",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e999",
    "-0",
    "18446744073709551616",
    "4294967296",
    "1099511627776",
    "1.5",
    "NaN",
    "\\u0000",
    "\\ud800",
    "\n",
    "\r\n",
    "\r",
    ",,",
    "\"a,b\"",
    "\"x\"\"y\"",
    "\u{feff}",
    "\u{0}",
    "é",
    "\u{1F600}",
    "\"clip\"",
    "\"roberta\"",
    "\"vision-text-dual-encoder\"",
    "{}",
    "[]",
    "\"model_type\"",
    "\"hidden_size\"",
    "\"image_path\"",
    "\"caption\"",
    "\"annotations\"",
    "\"images\"",
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"F32\"",
    "\"I8\"",
];

/// Interesting single bytes.
const BYTES: &[u8] = &[
    0, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b'[', b']', b',', b':', b'\n', b'\r', b'0', b'9', b'-',
    b'e', b'.', b' ', b'\\',
];

/// Apply 1..=4 random byte-level mutations.
fn mutate_bytes(c: &mut Case, b: &mut Vec<u8>) {
    for _ in 0..1 + c.below(4) {
        let n = b.len();
        match c.below(9) {
            0 if n > 0 => {
                let i = c.below(n);
                b[i] ^= 1 << c.below(8);
            }
            1 if n > 0 => {
                let i = c.below(n);
                b[i] = *c.pick(BYTES);
            }
            2 if n > 0 => {
                let i = c.below(n);
                let len = 1 + c.below((n - i).min(16));
                b.drain(i..i + len);
            }
            3 => {
                let i = c.below(n + 1);
                let t = c.pick(TOKENS).as_bytes().to_vec();
                b.splice(i..i, t);
            }
            4 if n > 0 => {
                let cut = c.below(n);
                b.truncate(cut);
            }
            5 if n > 0 => {
                // Duplicate a slice somewhere else.
                let i = c.below(n);
                let len = 1 + c.below((n - i).min(64));
                let piece = b[i..i + len].to_vec();
                let j = c.below(n + 1);
                b.splice(j..j, piece);
            }
            6 => {
                let i = c.below(n + 1);
                let k = 1 + c.below(8);
                let r: Vec<u8> = (0..k).map(|_| c.rng.next_u64() as u8).collect();
                b.splice(i..i, r);
            }
            7 if n > 0 => {
                // Replace a digit run's digit: numbers change size.
                let i = c.below(n);
                if b[i].is_ascii_digit() {
                    let d = *c.pick(b"0123456789");
                    b.insert(i, d);
                } else {
                    b[i] = *c.pick(b"0123456789");
                }
            }
            _ => {
                if n > 0 {
                    let i = c.below(n);
                    b[i] = c.rng.next_u64() as u8;
                }
            }
        }
    }
}

/// Numbers that sit on boundaries.
fn odd_number(c: &mut Case) -> Value {
    match c.below(24) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(2),
        3 => json!(3),
        4 => json!(-1),
        5 => json!(6),
        6 => json!(30),
        7 => json!(77),
        8 => json!(255),
        9 => json!(65536),
        10 => json!(1u64 << 24),
        11 => json!((1u64 << 24) + 1),
        12 => json!(1u64 << 31),
        13 => json!(1u64 << 32),
        14 => json!(1u64 << 40),
        15 => json!(u64::MAX),
        16 => json!(i64::MIN),
        17 => json!(0.5),
        18 => json!(-0.0),
        19 => json!(1e300),
        20 => json!(1e-300),
        21 => json!(30.0),
        22 => json!(4096),
        _ => json!(c.rng.next_u64() >> c.below(64)),
    }
}

fn random_string(c: &mut Case, dict: &[&str]) -> String {
    if c.chance(0.7) && !dict.is_empty() {
        return c.pick(dict).to_string();
    }
    let n = c.below(12);
    (0..n)
        .map(|_| match c.below(6) {
            0 => '"',
            1 => ',',
            2 => '\n',
            3 => 'é',
            _ => (b'a' + c.below(26) as u8) as char,
        })
        .collect()
}

/// A random JSON value (depth-limited); strings and keys come from `dict`.
fn random_value(c: &mut Case, dict: &[&str], depth: usize) -> Value {
    match c.below(if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(c.chance(0.5)),
        2 | 3 => odd_number(c),
        4 => Value::String(random_string(c, dict)),
        5 => {
            let n = c.below(4);
            if n == 2 && c.chance(0.5) {
                // [n, n]: square sizes.
                let v = odd_number(c);
                Value::Array(vec![v.clone(), v])
            } else {
                Value::Array((0..n).map(|_| random_value(c, dict, depth - 1)).collect())
            }
        }
        _ => {
            let n = c.below(4);
            let mut m = Map::new();
            for _ in 0..n {
                let k = random_string(c, dict);
                m.insert(k, random_value(c, dict, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// Where a node sits: object key or array index.
#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                here.push(Step::Key(k.clone()));
                paths(x, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                here.push(Step::Index(i));
                paths(x, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn node<'v>(v: &'v mut Value, path: &[Step]) -> &'v mut Value {
    let mut v = v;
    for s in path {
        v = match s {
            Step::Key(k) => v.get_mut(k.as_str()).unwrap(),
            Step::Index(i) => v.get_mut(*i).unwrap(),
        };
    }
    v
}

/// Apply 1..=4 structural mutations: a random value at a random node, a
/// key removed or added, an array element added, removed or duplicated.
fn mutate_json(c: &mut Case, v: &mut Value, dict: &[&str]) {
    for _ in 0..1 + c.below(4) {
        let mut all = Vec::new();
        paths(v, &mut Vec::new(), &mut all);
        let path = c.pick(&all).clone();
        let op = c.below(6);
        let target = node(v, &path);
        match (op, target) {
            (0, t) => *t = random_value(c, dict, 2),
            (1, t) => *t = odd_number(c),
            (2, Value::Object(m)) => {
                let k = random_string(c, dict);
                m.insert(k, random_value(c, dict, 2));
            }
            (2, Value::Array(a)) => {
                let i = c.below(a.len() + 1);
                a.insert(i, random_value(c, dict, 2));
            }
            (3, Value::Object(m)) if !m.is_empty() => {
                let k = m.keys().nth(c.below(m.len())).unwrap().clone();
                m.remove(&k);
            }
            (3, Value::Array(a)) if !a.is_empty() => {
                let i = c.below(a.len());
                a.remove(i);
            }
            (4, Value::Array(a)) if !a.is_empty() => {
                let i = c.below(a.len());
                let x = a[i].clone();
                a.push(x);
            }
            (5, t) => {
                // Same kind, other value: strings from the dictionary,
                // numbers from the odd ones.
                *t = match t {
                    Value::String(_) => Value::String(random_string(c, dict)),
                    Value::Number(_) => odd_number(c),
                    Value::Bool(b) => Value::Bool(!*b),
                    _ => random_value(c, dict, 1),
                }
            }
            (_, t) => *t = random_value(c, dict, 1),
        }
    }
}

/// A mutated copy of a JSON text: structurally, byte-wise, or both.
fn mutate_json_text(c: &mut Case, base: &Value, dict: &[&str]) -> Vec<u8> {
    let mode = c.below(3);
    let mut v = base.clone();
    if mode != 1 {
        mutate_json(c, &mut v, dict);
    }
    let mut bytes = if c.chance(0.5) {
        serde_json::to_vec_pretty(&v).unwrap()
    } else {
        serde_json::to_vec(&v).unwrap()
    };
    if mode != 0 {
        mutate_bytes(c, &mut bytes);
    }
    bytes
}

// ---------------------------------------------------------------- (a) config

const CONFIG_KEYS: &[&str] = &[
    "model_type",
    "clip",
    "vision-text-dual-encoder",
    "roberta",
    "clip_text_model",
    "clip_vision_model",
    "bert",
    "vision_config",
    "text_config",
    "vision_config_dict",
    "text_config_dict",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "quick_gelu",
    "gelu",
    "gelu_new",
    "tanh",
    "relu",
    "layer_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "projection_dim",
    "logit_scale_init_value",
];

fn config_bases() -> Vec<Value> {
    [
        "clip/model/config.json",
        "clip_roberta/model/config.json",
        "init/clip/config.json",
        "init/dual_clip_text/config.json",
        "init/dual_roberta/config.json",
        "prepare/clip_vision/config.json",
        "prepare/roberta_model/config.json",
    ]
    .iter()
    .map(|f| serde_json::from_slice(&read(f)).unwrap())
    .collect()
}

/// What an accepted config must satisfy, and the code that runs on it next.
fn check_config(c: &Case, cfg: &ModelConfig, input: &[u8]) {
    let v = &cfg.vision;
    c.ensure(
        v.hidden_size.is_multiple_of(v.num_attention_heads) && v.patch_size <= v.image_size,
        input,
        || format!("inconsistent vision config {v:?}"),
    );
    c.ensure(cfg.text.max_positions() >= 1, input, || {
        format!("no text positions: {:?}", cfg.text)
    });
    c.ensure(
        cfg.num_parameters() <= clip_wgpu::model::config::MAX_PARAMETERS,
        input,
        || format!("{} parameters", cfg.num_parameters()),
    );
    // The layout the model builds from it.
    if let Some(specs) = c.guard(input, || ClipModel::expected_tensors(cfg)) {
        let mut total: u128 = 0;
        for (name, shape) in &specs {
            c.ensure(shape.iter().all(|&d| d > 0), input, || {
                format!("{name} has an empty shape {shape:?}")
            });
            let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            c.ensure(n.is_some(), input, || {
                format!("{name}: shape {shape:?} overflows")
            });
            total += n.unwrap_or(0) as u128;
        }
        c.ensure(total <= 4 * cfg.num_parameters() + 64, input, || {
            format!(
                "the layout has {total} values, the estimate {}",
                cfg.num_parameters()
            )
        });
        // Random initialisation, for configs small enough to run.
        if total < 200_000 {
            if let Some(w) = c.guard(input, || clip_wgpu::model::init::init_weights(cfg, 7)) {
                for (name, shape) in &specs {
                    if let Some(t) = w.tensors.get(name) {
                        c.ensure(
                            t.shape.iter().product::<usize>() == t.data.len(),
                            input,
                            || {
                                format!(
                                    "init {name}: shape {:?} vs {} values",
                                    t.shape,
                                    t.data.len()
                                )
                            },
                        );
                    }
                    let _ = shape;
                }
            }
        }
    }
}

#[test]
fn fuzz_config() {
    let bases = config_bases();
    let dir = temp("fuzz-config");
    let mut accepted = 0;
    Fuzz::new("config", 15000).run(|c| {
        let base = c.pick(&bases).clone();
        let text = mutate_json_text(c, &base, CONFIG_KEYS);
        let parsed: Option<Value> = serde_json::from_slice(&text).ok();
        if let Some(v) = parsed {
            if let Some(cfg) = c.guard(&text, || ModelConfig::from_value(v, "config.json")) {
                accepted += 1;
                check_config(c, &cfg, &text);
            }
        }
        // The file path, now and then (reading, UTF-8, JSON errors).
        if c.iter % 16 == 0 {
            let f = dir.join("config.json");
            std::fs::write(&f, &text).unwrap();
            if let Some(cfg) = c.guard(&text, || ModelConfig::from_file(&f)) {
                check_config(c, &cfg, &text);
            }
        }
    });
    eprintln!("fuzz config: {accepted} mutated configs accepted");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_errors_name_file_and_key() {
    // A few fixed cases the fuzzer reaches only by luck.
    let base: Value = serde_json::from_slice(&read("clip/model/config.json")).unwrap();
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|v| v["vision_config"]["hidden_size"] = json!("abc")),
            "vision_config.hidden_size",
        ),
        (
            Box::new(|v| v["vision_config"]["image_size"] = json!(1u64 << 40)),
            "vision_config.image_size",
        ),
        (
            Box::new(|v| v["vision_config"]["image_size"] = json!([0, 0])),
            "vision_config.image_size",
        ),
        (
            Box::new(|v| v["text_config"]["num_hidden_layers"] = json!(1u64 << 33)),
            "text_config.num_hidden_layers",
        ),
        (
            Box::new(|v| v["text_config"]["layer_norm_eps"] = json!(1e300)),
            "text_config.layer_norm_eps",
        ),
        (
            Box::new(|v| v["text_config"]["hidden_act"] = json!("relu6")),
            "text_config.hidden_act",
        ),
        (
            Box::new(|v| v["vision_config"]["num_channels"] = json!(1)),
            "vision_config.num_channels",
        ),
        (
            Box::new(|v| {
                v["text_config"]["vocab_size"] = json!(1 << 24);
                v["text_config"]["hidden_size"] = json!(1 << 20);
                v["text_config"]["num_attention_heads"] = json!(1);
            }),
            "parameters",
        ),
        (Box::new(|v| v["model_type"] = json!(7)), "model_type"),
    ];
    for (edit, needle) in cases {
        let mut v = base.clone();
        edit(&mut v);
        let e = ModelConfig::from_value(v, "dir/config.json")
            .err()
            .unwrap_or_else(|| panic!("accepted a config that should fail on {needle}"));
        let msg = format!("{e:#}");
        assert!(
            msg.contains("dir/config.json") && msg.contains(needle),
            "{needle}: {msg}"
        );
    }
    // RoBERTa's positions start after pad_token_id + 1.
    let mut v: Value = serde_json::from_slice(&read("clip_roberta/model/config.json")).unwrap();
    v["text_config"]["max_position_embeddings"] = json!(1);
    let msg = format!(
        "{:#}",
        ModelConfig::from_value(v, "r/config.json").unwrap_err()
    );
    assert!(msg.contains("text_config.max_position_embeddings"), "{msg}");
}

// ---------------------------------------------------------------- (b) safetensors

const ST_KEYS: &[&str] = &[
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
    "format",
    "pt",
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "F4",
    "U64",
    "C64",
    "XX",
    "a.weight",
    "logit_scale",
];

/// (header JSON, data) of a safetensors file.
fn split_safetensors(b: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (header, b[8 + n..].to_vec())
}

fn join_safetensors(header: &[u8], data: &[u8], len: u64) -> Vec<u8> {
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// A safetensors file made up from random tensors: dtypes, shapes and
/// offsets that may or may not agree with each other and with the data.
fn random_safetensors(c: &mut Case) -> Vec<u8> {
    let mut header = Map::new();
    let mut offset = 0usize;
    let consistent = c.chance(0.6);
    for i in 0..c.below(5) {
        let dtype = *c.pick(&[
            "F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F4", "Q",
        ]);
        let size = match dtype {
            "F64" | "I64" => 8,
            "F32" | "I32" => 4,
            "F16" | "BF16" => 2,
            _ => 1,
        };
        let shape: Vec<u64> = (0..c.below(4))
            .map(|_| match c.below(8) {
                0 => 0,
                1 => 1u64 << c.below(64),
                _ => 1 + c.below(7) as u64,
            })
            .collect();
        let n: u64 = shape.iter().fold(1u64, |a, &d| a.wrapping_mul(d));
        let bytes = (n.wrapping_mul(size as u64)) as usize;
        let (start, end) = if consistent && bytes < 4096 {
            (offset, offset + bytes)
        } else {
            (c.below(offset + 8), c.below(offset + 64))
        };
        offset = end.max(offset);
        header.insert(
            format!("t{i}"),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}),
        );
    }
    if c.chance(0.3) {
        header.insert("__metadata__".into(), random_value(c, ST_KEYS, 1));
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    if c.chance(0.3) {
        mutate_bytes(c, &mut h);
    }
    let data_len = if consistent {
        offset
    } else {
        c.below(offset + 16)
    };
    let data: Vec<u8> = (0..data_len).map(|_| c.rng.next_u64() as u8).collect();
    let len = if c.chance(0.9) {
        h.len() as u64
    } else {
        *c.pick(&[
            0,
            1,
            h.len() as u64 + 1,
            u64::MAX,
            1 << 40,
            (h.len() + data.len()) as u64,
        ])
    };
    join_safetensors(&h, &data, len)
}

fn check_weights(c: &Case, w: &Weights, input: &[u8]) {
    for (name, t) in &w.tensors {
        c.ensure(
            t.shape.iter().product::<usize>() == t.data.len(),
            input,
            || {
                format!(
                    "float tensor {name:?}: shape {:?} but {} values",
                    t.shape,
                    t.data.len()
                )
            },
        );
    }
    for (name, (shape, data)) in &w.ints {
        c.ensure(shape.iter().product::<usize>() == data.len(), input, || {
            format!(
                "int tensor {name:?}: shape {shape:?} but {} values",
                data.len()
            )
        });
    }
}

#[test]
fn fuzz_safetensors() {
    let bases: Vec<Vec<u8>> = [
        "clip_roberta/model/model.safetensors",
        "clip/inputs.safetensors",
        "prepare/clip_vision/model.safetensors",
    ]
    .iter()
    .map(|f| read(f))
    .collect();
    let dir = temp("fuzz-safetensors");
    Fuzz::new("safetensors", 20000).run(|c| {
        let bytes = match c.below(5) {
            // Bytes anywhere (mostly the header).
            0 | 1 => {
                let mut b = c.pick(&bases).clone();
                let (h, _) = split_safetensors(&b);
                let hlen = serde_json::to_vec(&h).unwrap().len() + 8;
                if c.chance(0.8) {
                    // Mutate a copy of the header region only, then splice back.
                    let hend = (u64::from_le_bytes(b[..8].try_into().unwrap()) as usize + 8)
                        .min(b.len())
                        .max(hlen.min(b.len()));
                    let mut head = b[..hend].to_vec();
                    mutate_bytes(c, &mut head);
                    head.extend_from_slice(&b[hend..]);
                    b = head;
                } else {
                    mutate_bytes(c, &mut b);
                }
                b
            }
            // The header's JSON, mutated and written back.
            2 | 3 => {
                let base = c.pick(&bases).clone();
                let (h, data) = split_safetensors(&base);
                let mut v = h;
                mutate_json(c, &mut v, ST_KEYS);
                let hb = serde_json::to_vec(&v).unwrap();
                let len = hb.len() as u64;
                let mut data = data;
                if c.chance(0.3) {
                    let cut = c.below(data.len() + 1);
                    data.truncate(cut);
                }
                join_safetensors(&hb, &data, len)
            }
            _ => random_safetensors(c),
        };
        if let Some(w) = c.guard(&bytes, || Weights::from_bytes(&bytes)) {
            check_weights(c, &w, &bytes);
        }
        if c.iter % 32 == 0 {
            let f = dir.join("model.safetensors");
            std::fs::write(&f, &bytes).unwrap();
            if let Some(w) = c.guard(&bytes, || Weights::load_dir(&dir)) {
                check_weights(c, &w, &bytes);
            }
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fuzz_safetensors_index() {
    // Two shards of the RoBERTa fixture and their index.
    let dir = temp("fuzz-index");
    let w = Weights::load_file(&fixtures().join("clip_roberta/model/model.safetensors")).unwrap();
    let all: Vec<_> = w.tensors.into_iter().collect();
    let (a, b) = all.split_at(all.len() / 2);
    save_file(&dir.join("model-00001-of-00002.safetensors"), a).unwrap();
    save_file(&dir.join("model-00002-of-00002.safetensors"), b).unwrap();
    let mut map = Map::new();
    for (n, _) in a {
        map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
    }
    for (n, _) in b {
        map.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
    }
    let base = json!({"metadata": {"total_size": 1}, "weight_map": map});
    let index = dir.join("model.safetensors.index.json");
    let mut names: Vec<&str> = vec![
        "weight_map",
        "metadata",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model-00003-of-00002.safetensors",
        "",
        ".",
        "..",
        "/",
    ];
    names.extend(all.iter().take(4).map(|(n, _)| n.as_str()));
    Fuzz::new("safetensors_index", 2000).run(|c| {
        let text = mutate_json_text(c, &base, &names);
        std::fs::write(&index, &text).unwrap();
        if let Some(w) = c.guard(&text, || Weights::load_dir(&dir)) {
            check_weights(c, &w, &text);
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- (c) COCO

const COCO_KEYS: &[&str] = &[
    "images",
    "annotations",
    "id",
    "image_id",
    "file_name",
    "caption",
    "width",
    "height",
    "info",
    "licenses",
    "000000000001.jpg",
    "a.png",
    "",
    " ",
    "../x.jpg",
    "/abs.jpg",
];

fn coco_base() -> Value {
    let images: Vec<Value> = (1..=4)
        .map(|i| json!({"id": i, "file_name": format!("{i:012}.jpg"), "width": 40, "height": 30}))
        .collect();
    let mut anns = Vec::new();
    for i in 0..8 {
        anns.push(json!({"id": 100 + i, "image_id": 1 + i % 4, "caption": format!("caption {i}")}));
    }
    anns.push(json!({"id": 200, "image_id": 99, "caption": "orphan"}));
    anns.push(json!({"id": 201, "image_id": 2, "caption": "  "}));
    json!({"info": {"year": 2017}, "licenses": [], "images": images, "annotations": anns})
}

#[test]
fn fuzz_coco() {
    let dir = temp("fuzz-coco");
    std::fs::create_dir_all(dir.join("annotations")).unwrap();
    std::fs::create_dir_all(dir.join("train2017")).unwrap();
    let file = dir.join("annotations/captions_train2017.json");
    let image_dir = dir.join("train2017");
    let base = coco_base();
    let mut accepted = 0;
    Fuzz::new("coco", 8000).run(|c| {
        let text = mutate_json_text(c, &base, COCO_KEYS);
        std::fs::write(&file, &text).unwrap();
        let Some(d) = c.guard(&text, || sources::coco(&dir, Split::Train)) else {
            return;
        };
        accepted += 1;
        let annotations = serde_json::from_slice::<Value>(&text)
            .ok()
            .and_then(|v| v.get("annotations")?.as_array().map(Vec::len))
            .unwrap_or(0);
        c.ensure(
            d.examples.len() + d.skipped.len() == annotations,
            &text,
            || {
                format!(
                    "{} examples + {} skipped != {annotations} annotations",
                    d.examples.len(),
                    d.skipped.len()
                )
            },
        );
        for e in &d.examples {
            c.ensure(!e.caption.trim().is_empty(), &text, || {
                "an empty caption".into()
            });
            if let sources::ImageSource::File(p) = &e.image {
                let rel_ok = p.starts_with(&image_dir) || p.is_absolute();
                c.ensure(rel_ok, &text, || format!("image path {}", p.display()));
            }
        }
        let _ = d.skip_summary("COCO");
        let _ = d.num_images();
    });
    eprintln!("fuzz coco: {accepted} mutated files accepted");
    // The other split is missing: an error naming the file.
    let e = sources::coco(&dir, Split::Validation).unwrap_err();
    assert!(format!("{e:#}").contains("captions_val2017.json"), "{e:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- (d) tables

const TABLE_KEYS: &[&str] = &[
    "image_path",
    "caption",
    "file",
    "text",
    "a.png",
    "imgs/b.jpg",
    "",
    " ",
    "x,y",
    "q\"q",
];

const CSV_BASE: &str = "image_path,caption\n\
    a.png,a red circle\n\
    \"b.png\",\"a blue, round \"\"thing\"\"\"\n\
    c.png,\"two\nlines\"\r\n\
    a.png,another caption of a\n\
    d.png,\n";

fn jsonl_base() -> String {
    [
        json!({"image_path": "a.png", "caption": "a red circle"}),
        json!({"image_path": "b.png", "caption": ["one", "two"]}),
        json!({"image_path": "c.png", "caption": 7}),
        json!({"image_path": "a.png", "caption": null}),
        json!({"image_path": "", "caption": "no picture"}),
    ]
    .iter()
    .map(|v| v.to_string() + "\n")
    .collect()
}

/// Invariants of an accepted table: captions are text, one id per path,
/// distinct paths distinct ids.
fn check_table(c: &Case, d: &sources::Dataset, input: &[u8]) {
    let mut ids: HashMap<PathBuf, u64> = HashMap::new();
    let mut paths: HashMap<u64, PathBuf> = HashMap::new();
    for e in &d.examples {
        c.ensure(!e.caption.trim().is_empty(), input, || {
            "an empty caption".into()
        });
        let p = e.image.display_path();
        let id = *ids.entry(p.clone()).or_insert(e.image_id);
        c.ensure(id == e.image_id, input, || {
            format!("{} has two ids", p.display())
        });
        let q = paths.entry(e.image_id).or_insert(p.clone());
        c.ensure(*q == p, input, || {
            format!("id {} has two paths", e.image_id)
        });
    }
    let _ = d.skip_summary("table");
}

#[test]
fn fuzz_parse_csv() {
    let bases: Vec<Vec<u8>> = vec![
        CSV_BASE.as_bytes().to_vec(),
        std::fs::read(fixtures().join("clip/captions.json")).unwrap_or_default(),
        b"a,b,c\n1,2,3\n\n\"\"\n".to_vec(),
    ];
    Fuzz::new("parse_csv", 100000).run(|c| {
        let mut b = c.pick(&bases).clone();
        mutate_bytes(c, &mut b);
        let text = String::from_utf8_lossy(&b).into_owned();
        let lines = text.matches('\n').count() + text.matches('\r').count() + 1;
        let r = catch_unwind(AssertUnwindSafe(|| parse_csv(&text)));
        match r {
            Err(p) => c.fail(&b, &format!("panicked: {}", panic_text(&*p))),
            Ok(Err((line, msg))) => {
                c.ensure(!msg.is_empty() && line >= 1 && line <= lines, &b, || {
                    format!("error at line {line} of {lines}: {msg:?}")
                })
            }
            Ok(Ok(recs)) => {
                let mut last = 0;
                for (line, rec) in &recs {
                    c.ensure(*line >= 1 && *line >= last && *line <= lines, &b, || {
                        format!("record at line {line} after {last} (text has {lines})")
                    });
                    c.ensure(!rec.is_empty(), &b, || "an empty record".into());
                    last = *line;
                }
            }
        }
    });
}

/// RFC 4180 writing of records, with `\n` or `\r\n` line ends.
fn write_csv(records: &[Vec<String>], crlf: bool, quote_all: bool) -> String {
    let mut s = String::new();
    for r in records {
        let fields: Vec<String> = r
            .iter()
            .map(|f| {
                let special = f.contains([',', '"', '\n', '\r']) || f.starts_with(' ');
                // A lone empty field must be quoted, or the row reads as blank.
                let lone_empty = r.len() == 1 && f.is_empty();
                if quote_all || special || lone_empty {
                    format!("\"{}\"", f.replace('"', "\"\""))
                } else {
                    f.clone()
                }
            })
            .collect();
        s += &fields.join(",");
        s += if crlf { "\r\n" } else { "\n" };
    }
    s
}

#[test]
fn fuzz_csv_round_trip() {
    // Written by the RFC's rules, read back the same: fields and lines.
    Fuzz::new("csv_round_trip", 50000).run(|c| {
        let ncols = 1 + c.below(4);
        let records: Vec<Vec<String>> = (0..c.below(6))
            .map(|_| {
                (0..ncols)
                    .map(|_| {
                        let n = c.below(6);
                        (0..n)
                            .map(|_| *c.pick(&['a', 'b', ' ', ',', '"', '\n', '\r', 'é', '1']))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let crlf = c.chance(0.5);
        let text = write_csv(&records, crlf, c.chance(0.2));
        let got = match catch_unwind(|| parse_csv(&text)) {
            Ok(Ok(r)) => r,
            Ok(Err((l, m))) => c.fail(text.as_bytes(), &format!("error at line {l}: {m}")),
            Err(p) => c.fail(text.as_bytes(), &format!("panicked: {}", panic_text(&*p))),
        };
        let fields: Vec<Vec<String>> = got.iter().map(|(_, r)| r.clone()).collect();
        c.ensure(fields == records, text.as_bytes(), || {
            format!("read back {fields:?}, wrote {records:?}")
        });
        // Each record starts on the line after the previous one's line breaks.
        let mut line = 1;
        for ((l, _), r) in got.iter().zip(&records) {
            c.ensure(*l == line, text.as_bytes(), || {
                format!("record {r:?} reported at line {l}, expected {line}")
            });
            let inner: usize = r
                .iter()
                .map(|f| {
                    let f = f.replace("\r\n", "\n");
                    f.matches(['\n', '\r']).count()
                })
                .sum();
            line += 1 + inner;
        }
    });
}

#[test]
fn fuzz_table() {
    let dir = temp("fuzz-table");
    let jsonl = jsonl_base();
    let array = {
        let rows: Vec<Value> = jsonl
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        serde_json::to_string_pretty(&rows).unwrap()
    };
    let bases: Vec<(&str, Vec<u8>)> = vec![
        ("csv", CSV_BASE.as_bytes().to_vec()),
        ("jsonl", jsonl.as_bytes().to_vec()),
        ("json", array.as_bytes().to_vec()),
        ("json", jsonl.as_bytes().to_vec()),
    ];
    let mut accepted = 0;
    Fuzz::new("table", 20000).run(|c| {
        let (ext, base) = c.pick(&bases).clone();
        let bytes = if ext != "csv" && c.chance(0.5) {
            // Structure: mutate one row's JSON.
            let text = String::from_utf8(base).unwrap();
            let mut out = String::new();
            let pick = c.below(5);
            if text.trim_start().starts_with('[') {
                let v: Value = serde_json::from_str(&text).unwrap();
                out = String::from_utf8(mutate_json_text(c, &v, TABLE_KEYS)).unwrap_or_default();
            } else {
                for (i, l) in text.lines().enumerate() {
                    if i == pick {
                        let v: Value = serde_json::from_str(l).unwrap();
                        let mut v2 = v.clone();
                        mutate_json(c, &mut v2, TABLE_KEYS);
                        out += &v2.to_string();
                    } else {
                        out += l;
                    }
                    out.push('\n');
                }
            }
            out.into_bytes()
        } else {
            let mut b = base;
            mutate_bytes(c, &mut b);
            b
        };
        let ext = if c.chance(0.05) {
            *c.pick(&["CSV", "txt", "JSONL", ""])
        } else {
            ext
        };
        let f = dir.join(format!("t.{ext}"));
        std::fs::write(&f, &bytes).unwrap();
        let (ic, cc) = if c.chance(0.9) {
            ("image_path", "caption")
        } else {
            (*c.pick(TABLE_KEYS), *c.pick(TABLE_KEYS))
        };
        if let Some(d) = c.guard(&bytes, || sources::table(&f, ic, cc)) {
            accepted += 1;
            check_table(c, &d, &bytes);
        }
        let _ = std::fs::remove_file(&f);
    });
    eprintln!("fuzz table: {accepted} mutated tables accepted");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fuzz_sidecar_folder() {
    // Random trees of pictures and caption files (names, case, empty or
    // binary captions, nested folders).
    let root = temp("fuzz-sidecar");
    Fuzz::new("sidecar", 1000).run(|c| {
        let dir = root.join(format!("{}", c.iter));
        std::fs::create_dir_all(&dir).unwrap();
        for _ in 0..c.below(8) {
            let sub = if c.chance(0.3) { "sub/" } else { "" };
            let stem = *c.pick(&["a", "b", "a.b", "é", " ", ".hidden", "A"]);
            let ext = *c.pick(&["png", "PNG", "jpg", "txt", "TXT", "gif", "md", ""]);
            let p = dir.join(format!("{sub}{stem}.{ext}"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let content: Vec<u8> = match c.below(4) {
                0 => Vec::new(),
                1 => b"\n \n a caption \n".to_vec(),
                2 => vec![0xff, 0xfe, b'x'],
                _ => "\u{feff}caption".as_bytes().to_vec(),
            };
            std::fs::write(&p, content).unwrap();
        }
        let name = dir.display().to_string();
        if let Some(d) = c.guard(name.as_bytes(), || sources::sidecar_folder(&dir)) {
            check_table(c, &d, name.as_bytes());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    });
    std::fs::remove_dir_all(&root).unwrap();
}

// ---------------------------------------------------------------- (e) images

const PROC_KEYS: &[&str] = &[
    "size",
    "crop_size",
    "shortest_edge",
    "height",
    "width",
    "longest_edge",
    "do_resize",
    "do_center_crop",
    "do_rescale",
    "do_normalize",
    "rescale_factor",
    "image_mean",
    "image_std",
    "resample",
    "do_convert_rgb",
    "default_to_square",
];

fn small_image(c: &mut Case) -> image::DynamicImage {
    let (w, h) = (1 + c.below(40) as u32, 1 + c.below(40) as u32);
    let seed = c.rng.next_u64();
    let px = move |x: u32, y: u32, k: u64| {
        (mix64(seed ^ ((x as u64) << 20) ^ ((y as u64) << 40) ^ k) & 0xff) as u8
    };
    match c.below(4) {
        0 => image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([px(x, y, 0), px(x, y, 1), px(x, y, 2)])
        })),
        1 => image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| {
            image::Rgba([px(x, y, 0), px(x, y, 1), px(x, y, 2), px(x, y, 3)])
        })),
        2 => image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([px(x, y, 0)])
        })),
        _ => image::DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(w, h, |x, y| {
            image::LumaA([px(x, y, 0), px(x, y, 1)])
        })),
    }
}

#[test]
fn fuzz_image_processor_config() {
    let processor: Value =
        serde_json::from_slice(&read("clip/model/processor_config.json")).unwrap();
    let bases = vec![
        processor["image_processor"].clone(),
        serde_json::from_slice(&read("prepare/clip_vision/preprocessor_config.json")).unwrap(),
        json!({"size": {"height": 20, "width": 12}, "crop_size": 9, "resample": 2}),
    ];
    let file = Path::new("preprocessor_config.json");
    let mut ran = 0;
    Fuzz::new("image_processor", 20000).run(|c| {
        let base = c.pick(&bases).clone();
        let text = mutate_json_text(c, &base, PROC_KEYS);
        let Ok(v) = serde_json::from_slice::<Value>(&text) else {
            return;
        };
        let Some(cfg) = c.guard(&text, || ImageProcessorConfig::from_json(&v, file, "")) else {
            return;
        };
        let small = cfg.crop_h <= 256
            && cfg.crop_w <= 256
            && cfg.shortest_edge <= 256
            && cfg.resize_to.is_none_or(|(h, w)| h <= 256 && w <= 256);
        if !small {
            return;
        }
        let img = small_image(c);
        let (w, h) = (img.width() as usize, img.height() as usize);
        if let Some(px) = c.guard(&text, || preprocess(&img, &cfg)) {
            ran += 1;
            let (oh, ow) = cfg.output_hw(w, h);
            c.ensure(px.len() == 3 * oh * ow, &text, || {
                format!("{} values for {w}x{h} -> {ow}x{oh}", px.len())
            });
        }
    });
    eprintln!("fuzz image_processor: {ran} pictures preprocessed");
}

#[test]
fn elongated_picture_is_refused_not_allocated() {
    // 1x20000 at shortest_edge 224 would be a 224x4480000 picture.
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::new(1, 20000));
    let cfg = ImageProcessorConfig::default();
    let e = preprocess(&img, &cfg).unwrap_err();
    assert!(format!("{e:#}").contains("elongated"), "{e:#}");
}

#[test]
fn fuzz_decode_image() {
    // Mutated JPEGs (the hand-written decoder) and PNG/GIF (the image crate).
    let bases: Vec<Vec<u8>> = [
        "preprocess_extra/jtiny.jpg",
        "preprocess_extra/j420_odd.jpg",
        "preprocess_extra/j444_prog.jpg",
        "preprocess_extra/j420_prog_rst.jpg",
        "preprocess_extra/jgray_prog.jpg",
        "preprocess_extra/la.png",
        "preprocess_extra/pal.gif",
    ]
    .iter()
    .filter_map(|f| std::fs::read(fixtures().join(f)).ok())
    .filter(|b| b.len() < 64 * 1024)
    .collect();
    assert!(!bases.is_empty());
    let mut decoded = 0;
    Fuzz::new("decode_image", 1500).run(|c| {
        let mut b = c.pick(&bases).clone();
        // Few, mostly small changes keep the file decodable deep into it.
        let n = 1 + c.below(3);
        for _ in 0..n {
            let len = b.len();
            match c.below(4) {
                0 if len > 0 => {
                    let i = c.below(len);
                    b[i] ^= 1 << c.below(8);
                }
                1 if len > 0 => {
                    let i = c.below(len);
                    b[i] = c.rng.next_u64() as u8;
                }
                2 if len > 4 => {
                    let cut = 4 + c.below(len - 4);
                    b.truncate(cut);
                }
                _ if len > 0 => {
                    let i = c.below(len);
                    b[i] = *c.pick(&[0u8, 0xff, 0x7f, 0x80, 1]);
                }
                _ => {}
            }
        }
        if let Some(img) = c.guard(&b, || decode_image(&b)) {
            decoded += 1;
            let _ = c.guard(&b, || preprocess(&img, &ImageProcessorConfig::default()));
        }
    });
    eprintln!("fuzz decode_image: {decoded} mutated files decoded");
}

// ---------------------------------------------------------------- (f) tokenizer

const TOK_KEYS: &[&str] = &[
    "pad_token",
    "padding_side",
    "truncation_side",
    "left",
    "right",
    "content",
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<mask>",
    "model",
    "vocab",
    "merges",
    "type",
    "BPE",
    "WordPiece",
    "Unigram",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "added_tokens",
    "padding",
    "truncation",
    "id",
    "special",
    "ByteLevel",
    "RobertaProcessing",
    "sep",
    "cls",
];

#[test]
fn fuzz_tokenizer_files() {
    // The small RoBERTa tokenizer of the prepare fixtures: its
    // tokenizer.json and tokenizer_config.json mutated, then used.
    let dir = temp("fuzz-tokenizer");
    let tok: Value = serde_json::from_slice(&read("prepare/roberta_mlm/tokenizer.json")).unwrap();
    let cfg: Value =
        serde_json::from_slice(&read("prepare/roberta_mlm/tokenizer_config.json")).unwrap();
    let tok_text = serde_json::to_vec(&tok).unwrap();
    let mut loaded = 0;
    Fuzz::new("tokenizer", 3000).run(|c| {
        let (t, k) = match c.below(3) {
            0 => (tok_text.clone(), mutate_json_text(c, &cfg, TOK_KEYS)),
            1 => (
                mutate_json_text(c, &tok, TOK_KEYS),
                serde_json::to_vec(&cfg).unwrap(),
            ),
            _ => (
                mutate_json_text(c, &tok, TOK_KEYS),
                mutate_json_text(c, &cfg, TOK_KEYS),
            ),
        };
        std::fs::write(dir.join("tokenizer.json"), &t).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), &k).unwrap();
        let mut input = t.clone();
        input.extend_from_slice(b"\n----- tokenizer_config.json\n");
        input.extend_from_slice(&k);
        let Some(tk) = c.guard(&input, || {
            clip_wgpu::data::TextTokenizer::from_model_dir(&dir)
        }) else {
            return;
        };
        loaded += 1;
        let max_len = c.below(12);
        let texts = [
            "a cat",
            "",
            "é\u{0}\u{1F600} , ,",
            "a much longer caption with many words in it",
        ];
        if let Some((ids, mask)) = c.guard(&input, || tk.encode_batch(&texts, max_len)) {
            c.ensure(
                ids.len() == texts.len() * max_len && mask.len() == ids.len(),
                &input,
                || {
                    format!(
                        "{} ids, {} mask values for 4 x {max_len}",
                        ids.len(),
                        mask.len()
                    )
                },
            );
        }
        let _ = c.guard(&input, || tk.encode("a dog"));
    });
    eprintln!("fuzz tokenizer: {loaded} mutated tokenizers loaded");
    std::fs::remove_dir_all(&dir).unwrap();
}
