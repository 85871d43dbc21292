//! WebDataset shards: tar files holding training samples as consecutive
//! members that share a key (img2dataset's `00000.tar` with
//! `000000000.jpg`, `000000000.txt`, `000000000.json`, ...), read as a
//! stream with the `tar` crate (nothing is unpacked to disk).
//!
//! - Shard lists ([`expand_shards`]): brace patterns as the `braceexpand`
//!   package expands them (`data/{00000..00099}.tar`, zero padding kept,
//!   `{a,b}`, nested braces, `{0..10..2}`, backslash escapes, several
//!   patterns joined by `::` as WebDataset allows), globs (`data/*.tar`),
//!   or a list file (`.list` / `.shards`: one shard or pattern a line, `#`
//!   comments, relative paths against the list file's folder).
//! - Samples ([`split_key`]): WebDataset's rule (`base_plus_ext`): the key
//!   is the member path up to the first dot of its basename (`a.b/c.d.jpg`:
//!   key `a.b/c`, extension `d.jpg`); extensions are lower-cased; members of
//!   one sample are consecutive, and a sample never spans two shards. As in
//!   WebDataset's `tar_file_iterator`, only regular files count, names
//!   without a key are ignored, and `__...__` metadata members are skipped.
//! - The picture is the first of `jpg`, `png`, `jpeg`, `webp` the sample has
//!   (OpenCLIP's `image="jpg;png;jpeg;webp"`), decoded by the project's own
//!   decoders ([`crate::data::image::decode_image`]). The caption is the
//!   `.txt` (whole text, trimmed), or when there is none the `caption` key of
//!   the `.json`; with a caption column other than the default `caption`, it
//!   is that key of the `.json`.
//! - A sample without a picture or caption, a duplicate member, a member cut
//!   short and the rest of a truncated or corrupt shard are skipped and
//!   reported (place and reason), as unreadable pictures are.
//!
//! Training reads a stream ([`run_stream`], and on threads [`StreamLoader`]):
//! each epoch the shards are shuffled (seeded by the data seed and the
//! epoch), dealt round-robin to the ranks, read in that order, and their
//! samples pass through a shuffle buffer of at most `shuffle_buffer` samples
//! (fill it, then each new sample replaces a random one, which goes out;
//! the rest drain in random order at the end), so memory is bounded by the
//! buffer, whatever the number of shards.
//!
//! Exact resume: a [`Snapshot`] is the whole state of the stream between
//! two samples: the shard being read and the byte offset of its next sample,
//! the generator's state, and where each buffered sample lies (shard, byte
//! offset, key). The stream takes one every `snapshot_every` samples; a
//! [`ResumePoint`] is a snapshot plus the position to go on from (the
//! samples between are read again and dropped). Restoring reads each
//! buffered sample back from its shard.
//!
//! Evaluation reads the shards in order without shuffling ([`index`]): each
//! sample's caption and where its picture lies, which the loader opens
//! directly ([`ImageSource::TarMember`], [`load_member`]).

use crate::data::image::{decode_image, preprocess, ImageProcessorConfig};
use crate::data::loader::{catch_quietly, LoadedBatch, LoaderConfig, GIVE_UP_AFTER};
use crate::data::sources::{mix64, shuffle, Dataset, Example, ImageSource, Skipped, SplitMix64};
use crate::data::text::TextTokenizer;
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Picture extensions, in the order a sample's picture is chosen.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "png", "jpeg", "webp"];

/// The default `--shuffle_buffer`.
pub const DEFAULT_SHUFFLE_BUFFER: usize = 1000;

/// Samples between two snapshots of a training stream (a resume reads at
/// most this many samples again).
pub const DEFAULT_SNAPSHOT_EVERY: usize = 256;

/// A member larger than this is skipped (its data is not read into memory).
pub const MAX_MEMBER_BYTES: u64 = 1 << 28;

// ---------------------------------------------------------------------------
// Brace expansion (the `braceexpand` package, version 0.1.7).

/// The strings a brace pattern stands for, as Python's
/// `braceexpand.braceexpand(pattern)` (0.1.7, which WebDataset uses) gives
/// them: `{a,b}` alternatives, `{1..10}` and `{a..e}` ranges with an
/// optional step (`{0..10..2}`; ranges run down as well as up), integers
/// zero-padded to the wider end when either end has a leading zero
/// (`{07..10}`: 07 08 09 10), nested braces, a brace group that is neither
/// (`{x}`) kept as it is, and `\` escaping the next character (removed from
/// the results). Unbalanced braces are an error.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let chars: Vec<char> = pattern.chars().collect();
    let raw = parse_pattern(&chars).map_err(|_| {
        anyhow!("unbalanced braces in the shard pattern '{pattern}' (a {{ without its }} or the reverse)")
    })?;
    Ok(raw.into_iter().map(|s| unescape(&s)).collect())
}

struct Unbalanced;

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some(n) => out.push(n),
                None => out.push(c),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// braceexpand's `parse_pattern`: the product of literal parts and brace
/// expressions.
fn parse_pattern(p: &[char]) -> std::result::Result<Vec<String>, Unbalanced> {
    let (mut start, mut pos, mut depth) = (0usize, 0usize, 0i64);
    let mut items: Vec<Vec<String>> = Vec::new();
    while pos < p.len() {
        match p[pos] {
            '\\' => {
                pos += 2;
                continue;
            }
            '{' => {
                if depth == 0 && pos > start {
                    items.push(vec![p[start..pos].iter().collect()]);
                    start = pos;
                }
                depth += 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    let expr = &p[start + 1..pos];
                    match parse_expression(expr)? {
                        Some(v) => items.push(v),
                        None => {
                            items.push(vec!["{".into()]);
                            items.push(parse_pattern(expr)?);
                            items.push(vec!["}".into()]);
                        }
                    }
                    start = pos + 1;
                }
            }
            _ => {}
        }
        pos += 1;
    }
    if depth != 0 {
        return Err(Unbalanced);
    }
    if start < pos.min(p.len()) {
        items.push(vec![p[start..].iter().collect()]);
    }
    // itertools.product: the first item varies slowest.
    let mut out = vec![String::new()];
    for item in items {
        let mut next = Vec::with_capacity(out.len() * item.len());
        for prefix in &out {
            for s in &item {
                next.push(format!("{prefix}{s}"));
            }
        }
        out = next;
    }
    Ok(out)
}

fn parse_expression(e: &[char]) -> std::result::Result<Option<Vec<String>>, Unbalanced> {
    let s: String = e.iter().collect();
    if let Some(v) = int_range(&s) {
        return Ok(Some(v));
    }
    if let Some(v) = char_range(&s) {
        return Ok(Some(v));
    }
    parse_sequence(e)
}

/// `a,b,c` at depth 0 (None: no comma, not a sequence).
fn parse_sequence(e: &[char]) -> std::result::Result<Option<Vec<String>>, Unbalanced> {
    let (mut start, mut pos, mut depth) = (0usize, 0usize, 0i64);
    let mut out = Vec::new();
    let mut any = false;
    while pos < e.len() {
        match e[pos] {
            '\\' => {
                pos += 2;
                continue;
            }
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.extend(parse_pattern(&e[start..pos])?);
                start = pos + 1;
                any = true;
            }
            _ => {}
        }
        pos += 1;
    }
    if depth != 0 {
        return Err(Unbalanced);
    }
    if !any {
        return Ok(None);
    }
    out.extend(parse_pattern(&e[start.min(e.len())..])?);
    Ok(Some(out))
}

/// `(-?\d+)..(-?\d+)(..-?\d+)?`, split into its parts.
fn range_parts(s: &str, end_ok: impl Fn(&str) -> bool) -> Option<(&str, &str, Option<&str>)> {
    let (a, rest) = s.split_once("..")?;
    let (b, step) = match rest.split_once("..") {
        Some((b, st)) => (b, Some(st)),
        None => (rest, None),
    };
    if !end_ok(a) || !end_ok(b) {
        return None;
    }
    if let Some(st) = step {
        let digits = st.strip_prefix('-').unwrap_or(st);
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    Some((a, b, step.map(|st| st.strip_prefix('-').unwrap_or(st))))
}

fn step_of(step: Option<&str>) -> Option<i128> {
    match step {
        None => Some(1),
        Some(s) => {
            let v: i128 = s.parse().ok()?;
            Some(if v == 0 { 1 } else { v })
        }
    }
}

fn int_range(s: &str) -> Option<Vec<String>> {
    let is_int = |x: &str| {
        let d = x.strip_prefix('-').unwrap_or(x);
        !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit())
    };
    let (a, b, step) = range_parts(s, is_int)?;
    let padded = [a, b]
        .iter()
        .any(|x| *x != "0" && *x != "-0" && (x.starts_with('0') || x.starts_with("-0")));
    let width = if padded { a.len().max(b.len()) } else { 0 };
    let (start, end): (i128, i128) = (a.parse().ok()?, b.parse().ok()?);
    let step = step_of(step)?;
    let mut out = Vec::new();
    if start < end {
        let mut i = start;
        while i <= end {
            out.push(format!("{i:0width$}"));
            i += step;
        }
    } else {
        let mut i = start;
        while i >= end {
            out.push(format!("{i:0width$}"));
            i -= step;
        }
    }
    Some(out)
}

fn char_range(s: &str) -> Option<Vec<String>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let letter = |x: &str| x.len() == 1 && x.as_bytes()[0].is_ascii_alphabetic();
    let (a, b, step) = range_parts(s, letter)?;
    let pos = |x: &str| ALPHABET.iter().position(|&c| c == x.as_bytes()[0]);
    let (start, end) = (pos(a)? as i64, pos(b)? as i64);
    let step = step_of(step)?.min(i64::MAX as i128) as i64;
    let mut out = Vec::new();
    if start < end {
        let mut i = start;
        while i <= end {
            out.push((ALPHABET[i as usize] as char).to_string());
            i += step;
        }
    } else {
        let mut i = start;
        while i >= end {
            out.push((ALPHABET[i as usize] as char).to_string());
            i -= step;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Shard lists.

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn lower_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

fn is_list_file(p: &Path) -> bool {
    let n = lower_name(p);
    let s = p.to_string_lossy();
    (n.ends_with(".list") || n.ends_with(".shards")) && !s.contains('{') && !has_glob(&s)
}

/// Whether a `--train_file` / `--validation_file` value names WebDataset
/// shards rather than a CSV / JSON-lines table: a brace pattern, a glob,
/// `::`-joined patterns, a `.tar` file, or a shard list file (`.list`,
/// `.shards`).
pub fn is_shard_spec(p: &Path) -> bool {
    let s = p.to_string_lossy();
    let n = lower_name(p);
    if [".csv", ".json", ".jsonl"].iter().any(|x| n.ends_with(x)) && !s.contains('{') {
        // A table (even one whose name has brackets).
        return false;
    }
    s.contains('{')
        || s.contains("::")
        || has_glob(&s)
        || n.ends_with(".tar")
        || n.ends_with(".tar.gz")
        || n.ends_with(".tgz")
        || is_list_file(p)
}

/// The shard files a spec names, in order (see the module docs). Errors
/// name the pattern, the list file and line, or the missing file.
pub fn expand_shards(spec: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if is_list_file(spec) {
        let text = std::fs::read_to_string(spec)
            .with_context(|| format!("reading the shard list {}", spec.display()))?;
        let dir = spec.parent().unwrap_or(Path::new(""));
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let p = Path::new(line);
            let full = if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            };
            let got = expand_pattern(&full.to_string_lossy())
                .with_context(|| format!("{}:{}", spec.display(), i + 1))?;
            out.extend(got);
        }
        ensure!(
            !out.is_empty(),
            "the shard list {} names no shards",
            spec.display()
        );
    } else {
        out = expand_pattern(&spec.to_string_lossy())?;
    }
    for p in &out {
        let n = lower_name(p);
        ensure!(
            !(n.ends_with(".gz")
                || n.ends_with(".tgz")
                || n.ends_with(".zst")
                || n.ends_with(".xz")),
            "{}: compressed shards are not read; decompress them (gunzip) into plain .tar files",
            p.display()
        );
    }
    Ok(out)
}

fn expand_pattern(pattern: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for part in pattern.split("::").filter(|s| !s.is_empty()) {
        for name in expand_braces(part)? {
            if has_glob(&name) {
                let mut found: Vec<PathBuf> = glob::glob(&name)
                    .map_err(|e| {
                        anyhow!("bad glob {name:?} in the shard pattern {pattern:?}: {e}")
                    })?
                    .filter_map(|r| r.ok())
                    .filter(|p| p.is_file())
                    .collect();
                found.sort();
                ensure!(
                    !found.is_empty(),
                    "no shard file matches {name:?} (from the pattern {pattern:?})"
                );
                out.extend(found);
            } else {
                let p = PathBuf::from(&name);
                if !p.is_file() {
                    if name != pattern {
                        bail!(
                            "shard {} does not exist (from the pattern {pattern:?})",
                            p.display()
                        );
                    }
                    bail!("shard {} does not exist", p.display());
                }
                out.push(p);
            }
        }
    }
    ensure!(
        !out.is_empty(),
        "the shard pattern {pattern:?} names no files"
    );
    Ok(out)
}

// ---------------------------------------------------------------------------
// Keys.

/// WebDataset's `base_plus_ext`: the regex `^((?:.*/|)[^.]+)[.]([^/]*)$`
/// applied to a member path: (key, extension), or None when the name has
/// no key (no dot in its basename, or a dot first with a dotted folder
/// before it). `a.b/c.d.jpg` gives `a.b/c` and `d.jpg`; `x/.h.jpg` gives
/// `x/` and `h.jpg`. The extension is returned as written (callers
/// lower-case it, as WebDataset's `group_by_keys` does).
pub fn split_key(path: &str) -> Option<(&str, &str)> {
    let b = path.as_bytes();
    // Candidate starts of `[^.]+`: after each '/' (the last first, as the
    // greedy `.*/` tries them), then the start; `.` matches no newline.
    let mut starts: Vec<usize> = Vec::new();
    let first_newline = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
    for (i, &c) in b.iter().enumerate().rev() {
        if c == b'/' && i < first_newline {
            starts.push(i + 1);
        }
    }
    starts.push(0);
    for q in starts {
        let run = b[q..].iter().take_while(|&&c| c != b'.').count();
        if run == 0 {
            continue;
        }
        let dot = q + run;
        if dot >= b.len() {
            continue;
        }
        if b[dot + 1..].contains(&b'/') {
            continue;
        }
        return Some((&path[..dot], &path[dot + 1..]));
    }
    None
}

/// A member WebDataset skips as metadata: `__name__` at the top level, or
/// any name starting with `__..__` followed by the end or a `/`.
fn is_meta(name: &str) -> bool {
    if !name.contains('/') && name.starts_with("__") && name.ends_with("__") && name.len() >= 4 {
        return true;
    }
    // re.match(r"__[^/]*__($|/)", name)
    if let Some(rest) = name.strip_prefix("__") {
        let seg_end = rest.find('/').unwrap_or(rest.len());
        let seg = &rest[..seg_end];
        // `[^/]*` is greedy and backtracks: any "__" inside the first
        // segment that ends it (at its end) matches.
        if seg.ends_with("__") && (seg_end == rest.len() || rest.as_bytes()[seg_end] == b'/') {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------
// Reading shards.

/// How a sample's caption is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptionRule {
    /// The `.txt`, else the `caption` key of the `.json`.
    TxtThenJson,
    /// This key of the `.json`.
    JsonKey(String),
}

impl CaptionRule {
    /// The rule for a `--caption_column` value: the default `caption`
    /// reads the `.txt` first.
    pub fn for_column(column: &str) -> CaptionRule {
        if column == "caption" {
            CaptionRule::TxtThenJson
        } else {
            CaptionRule::JsonKey(column.to_string())
        }
    }

    fn wants(&self, ext: &str) -> bool {
        match self {
            CaptionRule::TxtThenJson => ext == "txt" || ext == "json",
            CaptionRule::JsonKey(_) => ext == "json",
        }
    }
}

/// The shards of a data set and how its samples are read.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardSet {
    pub shards: Vec<PathBuf>,
    pub caption: CaptionRule,
    /// What was given (for messages).
    pub spec: String,
}

impl ShardSet {
    /// The shards `spec` names ([`expand_shards`]).
    pub fn open(spec: &Path, caption: CaptionRule) -> Result<ShardSet> {
        Ok(ShardSet {
            shards: expand_shards(spec)?,
            caption,
            spec: spec.display().to_string(),
        })
    }
}

/// One training sample read from a shard.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub key: String,
    /// Index of its shard in [`ShardSet::shards`].
    pub shard: usize,
    /// Byte offset of its first member's headers in the shard.
    pub offset: u64,
    /// The picture's member name, and its bytes (empty when only indexed).
    pub image_member: String,
    /// Byte offset of the picture member's headers.
    pub image_offset: u64,
    pub image: Vec<u8>,
    pub caption: String,
}

impl Sample {
    /// `shard.tar:key` for messages.
    pub fn place(&self, set: &ShardSet) -> String {
        format!("{}:{}", set.shards[self.shard].display(), self.image_member)
    }
}

/// What reading a shard finds, in order.
enum Event {
    /// A sample, and the byte offset where the next one starts.
    Sample(Sample, u64),
    /// Something left out: place and reason.
    Skip(String, String),
    /// A member left out of the sample being read (which goes on).
    SkipMember(String, String),
}

/// Continue reading, or stop.
#[derive(PartialEq)]
enum Flow {
    Go,
    Stop,
}

struct Member {
    name: String,
    ext: String,
    start: u64,
    data: Vec<u8>,
}

struct Pending {
    key: String,
    start: u64,
    members: Vec<Member>,
}

fn round_block(n: u64) -> u64 {
    n.div_ceil(512).saturating_mul(512)
}

/// Read the samples of shard `idx` from byte `offset`, calling `visit`
/// with each (and each thing skipped) in order. `all_data`: read every
/// member's bytes (streaming); otherwise only the caption members' (the
/// pictures are skipped over by seeking). A read error ends the shard with
/// a skip record (a truncated or corrupt shard); only a failure to open or
/// seek the file is an error.
fn read_shard(
    set: &ShardSet,
    idx: usize,
    offset: u64,
    all_data: bool,
    visit: &mut dyn FnMut(Event) -> Result<Flow>,
) -> Result<Flow> {
    let path = &set.shards[idx];
    let mut file = File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading shard {}", path.display()))?
        .len();
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))
            .with_context(|| format!("seeking to byte {offset} of shard {}", path.display()))?;
    }
    let reader = BufReader::with_capacity(1 << 16, file);
    let mut archive = tar::Archive::new(reader);
    let shown = path.display().to_string();
    if all_data {
        let entries = archive
            .entries()
            .with_context(|| format!("reading shard {shown}"))?;
        group_entries(set, idx, &shown, offset, len, true, entries, visit)
    } else {
        let entries = archive
            .entries_with_seek()
            .with_context(|| format!("reading shard {shown}"))?;
        group_entries(set, idx, &shown, offset, len, false, entries, visit)
    }
}

#[allow(clippy::too_many_arguments)]
fn group_entries<R: Read>(
    set: &ShardSet,
    idx: usize,
    shown: &str,
    base: u64,
    file_len: u64,
    all_data: bool,
    entries: tar::Entries<'_, R>,
    visit: &mut dyn FnMut(Event) -> Result<Flow>,
) -> Result<Flow> {
    let mut pending: Option<Pending> = None;
    // Where the next member's headers begin (after the previous entry's
    // padded data).
    let mut next_start = base;
    let mut last_name = String::from("(the start)");
    let finish =
        |p: Pending, next: u64, visit: &mut dyn FnMut(Event) -> Result<Flow>| match make_sample(
            set, idx, shown, p,
        ) {
            Ok(s) => visit(Event::Sample(s, next)),
            Err((place, why)) => visit(Event::Skip(place, why)),
        };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // The members read so far are whole: the pending sample
                // stands; the rest of the shard cannot be found.
                if let Some(p) = pending.take() {
                    if finish(p, next_start, visit)? == Flow::Stop {
                        return Ok(Flow::Stop);
                    }
                }
                return visit(Event::Skip(
                    shown.to_string(),
                    format!("truncated or corrupt shard after {last_name}: {e}; the rest of it is skipped"),
                ));
            }
        };
        let start = next_start;
        let kind = entry.header().entry_type();
        let size = entry.size();
        let on_disk = if kind.is_gnu_sparse() {
            entry.header().entry_size().unwrap_or(size)
        } else {
            size
        };
        next_start = base + entry.raw_file_position() + round_block(on_disk);
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        last_name = name.clone();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) || is_meta(&name) {
            continue;
        }
        let Some((key, ext)) = split_key(&name) else {
            continue;
        };
        let (key, ext) = (key.to_string(), ext.to_ascii_lowercase());
        let same = pending.as_ref().is_some_and(|p| p.key == key);
        if !same {
            if let Some(p) = pending.take() {
                // The sample ended; the next one starts at this member.
                if finish(p, start, visit)? == Flow::Stop {
                    return Ok(Flow::Stop);
                }
            }
            pending = Some(Pending {
                key: key.clone(),
                start,
                members: Vec::new(),
            });
        }
        let p = pending.as_mut().expect("a sample in progress");
        if p.members.iter().any(|m| m.ext == ext) {
            if visit(Event::SkipMember(
                format!("{shown}:{name}"),
                format!("a second .{ext} member of sample {key}; the first is kept"),
            ))? == Flow::Stop
            {
                return Ok(Flow::Stop);
            }
            continue;
        }
        let want = all_data || set.caption.wants(&ext);
        let mut data = Vec::new();
        let data_end = base + entry.raw_file_position() + size;
        if data_end > file_len {
            // Cut short (seen without reading it): this sample is lost, and
            // the shard ends here.
            let p = pending.take().expect("a sample in progress");
            return visit(Event::Skip(
                format!("{shown}:{name}"),
                format!(
                    "truncated shard: member cut short ({} of its {size} bytes); sample {} and the \
                     rest of the shard are skipped",
                    file_len.saturating_sub(data_end - size),
                    p.key
                ),
            ));
        }
        if want {
            if size > MAX_MEMBER_BYTES {
                let place = format!("{shown}:{name}");
                if visit(Event::SkipMember(
                    place,
                    format!(
                        "member of {size} bytes, more than the {} MiB read into memory",
                        MAX_MEMBER_BYTES >> 20
                    ),
                ))? == Flow::Stop
                {
                    return Ok(Flow::Stop);
                }
                continue;
            }
            data.reserve(size as usize);
            let got = entry.read_to_end(&mut data);
            if got.is_err() || data.len() as u64 != size {
                // Cut short: this sample is lost, and the shard ends here.
                let why = match got {
                    Err(e) => format!("{e}"),
                    Ok(n) => format!("{n} of its {size} bytes"),
                };
                let p = pending.take().expect("a sample in progress");
                return visit(Event::Skip(
                    format!("{shown}:{name}"),
                    format!(
                        "truncated shard: member cut short ({why}); sample {} and the rest of the shard are skipped",
                        p.key
                    ),
                ));
            }
        }
        p.members.push(Member {
            name,
            ext,
            start,
            data,
        });
    }
    if let Some(p) = pending.take() {
        return finish(p, next_start, visit);
    }
    Ok(Flow::Go)
}

/// A sample from its members: its picture and caption, or why not.
fn make_sample(
    set: &ShardSet,
    idx: usize,
    shown: &str,
    p: Pending,
) -> std::result::Result<Sample, (String, String)> {
    let place = format!("{shown}:{}", p.key);
    let exts: Vec<&str> = p.members.iter().map(|m| m.ext.as_str()).collect();
    let Some(img) = IMAGE_EXTENSIONS
        .iter()
        .find_map(|x| p.members.iter().find(|m| m.ext == *x))
    else {
        return Err((
            place,
            format!(
                "no picture (.jpg, .png, .jpeg or .webp) among its members ({})",
                exts.join(", ")
            ),
        ));
    };
    let member = |ext: &str| p.members.iter().find(|m| m.ext == ext);
    let from_json = |key: &str| -> std::result::Result<Option<String>, String> {
        let Some(j) = member("json") else {
            return Ok(None);
        };
        let v: Value =
            serde_json::from_slice(&j.data).map_err(|e| format!("its .json is not JSON ({e})"))?;
        Ok(match v.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::Bool(b)) => Some(b.to_string()),
            _ => None,
        })
    };
    let caption = match &set.caption {
        CaptionRule::TxtThenJson => match member("txt") {
            Some(t) => Some(String::from_utf8_lossy(&t.data).into_owned()),
            None => from_json("caption").map_err(|e| (place.clone(), e))?,
        },
        CaptionRule::JsonKey(k) => from_json(k).map_err(|e| (place.clone(), e))?,
    };
    let caption = caption
        .map(|c| c.trim().trim_start_matches('\u{feff}').trim().to_string())
        .unwrap_or_default();
    if caption.is_empty() {
        let what = match &set.caption {
            CaptionRule::TxtThenJson => {
                "no caption (an empty or missing .txt, and no \"caption\" in a .json)".to_string()
            }
            CaptionRule::JsonKey(k) => format!("no caption (no text under {k:?} in a .json)"),
        };
        return Err((place, format!("{what}; members: {}", exts.join(", "))));
    }
    let image_member = img.name.clone();
    let image_offset = img.start;
    let image = p
        .members
        .into_iter()
        .find(|m| m.name == image_member)
        .map(|m| m.data)
        .unwrap_or_default();
    Ok(Sample {
        key: p.key,
        shard: idx,
        offset: p.start,
        image_member,
        image_offset,
        image,
        caption,
    })
}

/// The bytes of member `name` whose headers start at byte `offset` of
/// `shard` (an evaluation picture found by [`index`]).
pub fn load_member(shard: &Path, offset: u64, name: &str) -> Result<Vec<u8>> {
    let mut file =
        File::open(shard).with_context(|| format!("opening shard {}", shard.display()))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries = archive.entries()?;
    let mut entry = entries
        .next()
        .with_context(|| format!("{}: no member at byte {offset}", shard.display()))?
        .with_context(|| format!("{}: reading the member at byte {offset}", shard.display()))?;
    let got = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    ensure!(
        got == name,
        "{}: the member at byte {offset} is {got}, not {name} (was the shard rewritten?)",
        shard.display()
    );
    let size = entry.size();
    ensure!(
        size <= MAX_MEMBER_BYTES,
        "{}:{name}: {size} bytes is too large",
        shard.display()
    );
    let mut data = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut data)?;
    ensure!(
        data.len() as u64 == size,
        "{}:{name}: cut short ({} of {size} bytes)",
        shard.display(),
        data.len()
    );
    Ok(data)
}

/// Every sample of the shards in order, without shuffling: the captions,
/// and where each picture lies (read later by [`load_member`]). At most
/// `max` examples. `image_id` is the sample's index.
pub fn index(set: &ShardSet, max: Option<usize>) -> Result<Dataset> {
    let mut out = Dataset::default();
    let limit = max.unwrap_or(usize::MAX);
    for idx in 0..set.shards.len() {
        if out.examples.len() >= limit {
            break;
        }
        let shard = Arc::new(set.shards[idx].clone());
        let flow = read_shard(set, idx, 0, false, &mut |ev| {
            match ev {
                Event::Sample(s, _) => {
                    let image_id = out.examples.len() as u64;
                    out.examples.push(Example {
                        image: ImageSource::TarMember {
                            shard: shard.to_path_buf(),
                            offset: s.image_offset,
                            member: s.image_member,
                        },
                        caption: s.caption,
                        image_id,
                    });
                }
                Event::Skip(place, reason) | Event::SkipMember(place, reason) => {
                    out.skipped.push(Skipped { place, reason })
                }
            }
            Ok(if out.examples.len() >= limit {
                Flow::Stop
            } else {
                Flow::Go
            })
        })?;
        if flow == Flow::Stop {
            break;
        }
    }
    Ok(out)
}

/// The number of samples with a picture and a caption in the shards (a
/// scan of the members' headers and captions, the pictures skipped over).
pub fn count_samples(set: &ShardSet) -> Result<usize> {
    let mut n = 0usize;
    for idx in 0..set.shards.len() {
        read_shard(set, idx, 0, false, &mut |ev| {
            if let Event::Sample(..) = ev {
                n += 1;
            }
            Ok(Flow::Go)
        })?;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// The training stream.

/// What fixes a rank's stream of one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamConfig {
    /// The data seed.
    pub seed: u64,
    pub epoch: u64,
    pub rank: usize,
    pub world: usize,
    /// Samples the shuffle buffer holds at most (0 and 1: no shuffling
    /// within shards).
    pub shuffle_buffer: usize,
    /// The epoch ends after this many samples (of this rank).
    pub max_samples: Option<u64>,
    /// A snapshot every this many samples.
    pub snapshot_every: usize,
}

impl StreamConfig {
    pub fn new(seed: u64, epoch: u64) -> StreamConfig {
        StreamConfig {
            seed,
            epoch,
            rank: 0,
            world: 1,
            shuffle_buffer: DEFAULT_SHUFFLE_BUFFER,
            max_samples: None,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
        }
    }
}

/// This rank's shards of the epoch, in reading order: all shards shuffled
/// by (seed, epoch), then every `world`-th from `rank` (WebDataset's
/// `split_by_node` after the shard shuffle). Indices into the shard list.
pub fn rank_shards(n: usize, cfg: &StreamConfig) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(
        &mut order,
        mix64(mix64(cfg.seed ^ 0x5a4d_5eed_0000_0001) ^ cfg.epoch),
    );
    order
        .into_iter()
        .skip(cfg.rank)
        .step_by(cfg.world.max(1))
        .collect()
}

/// Where a buffered sample lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufRef {
    pub shard: usize,
    pub offset: u64,
    pub key: String,
}

/// The whole state of a rank's stream between two samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub epoch: u64,
    pub rank: usize,
    pub world: usize,
    /// Samples the stream has given out.
    pub emitted: u64,
    /// Index into [`rank_shards`] of the shard being read (its length once
    /// all are read).
    pub shard: usize,
    /// Byte offset in that shard where the next sample starts.
    pub offset: u64,
    /// The shuffle generator's state.
    pub rng: u64,
    /// The buffered samples, in buffer order.
    pub buffer: Vec<BufRef>,
}

impl Snapshot {
    /// The state before the first sample of an epoch.
    pub fn start(cfg: &StreamConfig) -> Snapshot {
        Snapshot {
            epoch: cfg.epoch,
            rank: cfg.rank,
            world: cfg.world,
            emitted: 0,
            shard: 0,
            offset: 0,
            rng: mix64(mix64(cfg.seed ^ 0xb0ff_e125_0000_0002) ^ cfg.epoch)
                ^ mix64(cfg.rank as u64 + 1),
            buffer: Vec::new(),
        }
    }
}

/// A snapshot and the position (samples given out) to go on from; the
/// samples between are read again and dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    pub snapshot: Snapshot,
    pub position: u64,
}

impl ResumePoint {
    pub fn to_json(&self) -> Value {
        let s = &self.snapshot;
        json!({
            "position": self.position,
            "epoch": s.epoch,
            "rank": s.rank,
            "world": s.world,
            "emitted": s.emitted,
            "shard": s.shard,
            "offset": s.offset,
            "rng": s.rng.to_string(),
            "buffer": s.buffer.iter().map(|b| json!([b.shard, b.offset, b.key])).collect::<Vec<_>>(),
        })
    }

    pub fn from_json(v: &Value) -> Result<ResumePoint> {
        let u = |k: &str| -> Result<u64> {
            v.get(k)
                .and_then(Value::as_u64)
                .with_context(|| format!("the data stream state has no integer {k:?}"))
        };
        let rng: u64 = v
            .get("rng")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .context("the data stream state has no generator state \"rng\"")?;
        let mut buffer = Vec::new();
        for b in v
            .get("buffer")
            .and_then(Value::as_array)
            .context("the data stream state has no \"buffer\" list")?
        {
            let parts = b.as_array().filter(|a| a.len() == 3);
            let r = parts.and_then(|a| {
                Some(BufRef {
                    shard: a[0].as_u64()? as usize,
                    offset: a[1].as_u64()?,
                    key: a[2].as_str()?.to_string(),
                })
            });
            buffer
                .push(r.with_context(|| format!("bad buffer entry {b} in the data stream state"))?);
        }
        Ok(ResumePoint {
            position: u("position")?,
            snapshot: Snapshot {
                epoch: u("epoch")?,
                rank: u("rank")? as usize,
                world: u("world")? as usize,
                emitted: u("emitted")?,
                shard: u("shard")? as usize,
                offset: u("offset")?,
                rng,
                buffer,
            },
        })
    }
}

/// What [`run_stream`] gives out.
pub enum StreamOut {
    /// The next sample (number `seq` of the epoch), with what was skipped
    /// while reading up to it.
    Sample {
        seq: u64,
        sample: Sample,
        skipped: Vec<(String, String)>,
    },
    /// The state after `snapshot.emitted` samples (before the next).
    Snapshot(Snapshot),
    /// The end of the epoch, with what was skipped since the last sample.
    End { skipped: Vec<(String, String)> },
}

/// Counters of a stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Samples read from the shards (buffer restores included).
    pub read: u64,
    /// Things skipped (broken samples, members, shard ends).
    pub skipped: u64,
    /// The most samples the shuffle buffer held at once.
    pub max_buffered: usize,
}

struct Streamer<'a> {
    cfg: &'a StreamConfig,
    order: Vec<usize>,
    snap: Snapshot,
    buffer: Vec<Sample>,
    rng: SplitMix64,
    pending_skips: Vec<(String, String)>,
    stats: StreamStats,
    out: &'a mut dyn FnMut(StreamOut, &StreamStats) -> Result<bool>,
    done: bool,
}

impl Streamer<'_> {
    fn capacity(&self) -> usize {
        self.cfg.shuffle_buffer.max(1)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            rng: self.rng.0,
            buffer: self
                .buffer
                .iter()
                .map(|s| BufRef {
                    shard: s.shard,
                    offset: s.offset,
                    key: s.key.clone(),
                })
                .collect(),
            ..self.snap.clone()
        }
    }

    fn emit(&mut self, sample: Sample) -> Result<()> {
        let seq = self.snap.emitted;
        self.snap.emitted += 1;
        let every = self.cfg.snapshot_every.max(1) as u64;
        if self.snap.emitted.is_multiple_of(every) {
            let s = self.snapshot();
            if !(self.out)(StreamOut::Snapshot(s), &self.stats)? {
                self.done = true;
            }
        }
        let skipped = std::mem::take(&mut self.pending_skips);
        if !(self.out)(
            StreamOut::Sample {
                seq,
                sample,
                skipped,
            },
            &self.stats,
        )? {
            self.done = true;
        }
        if self.cfg.max_samples.is_some_and(|m| self.snap.emitted >= m) {
            self.done = true;
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event) -> Result<Flow> {
        match ev {
            Event::Skip(place, why) | Event::SkipMember(place, why) => {
                self.stats.skipped += 1;
                self.pending_skips.push((place, why));
            }
            Event::Sample(s, next) => {
                self.stats.read += 1;
                self.snap.offset = next;
                if self.buffer.len() < self.capacity() {
                    self.buffer.push(s);
                    self.stats.max_buffered = self.stats.max_buffered.max(self.buffer.len());
                } else {
                    let k = self.rng.below(self.buffer.len() as u64) as usize;
                    let out = std::mem::replace(&mut self.buffer[k], s);
                    self.emit(out)?;
                }
            }
        }
        Ok(if self.done { Flow::Stop } else { Flow::Go })
    }
}

/// Read back the sample at `r` (a snapshot's buffer entry).
fn read_back(set: &ShardSet, r: &BufRef) -> Result<Sample> {
    ensure!(
        r.shard < set.shards.len(),
        "the data stream state refers to shard {} but there are {}",
        r.shard,
        set.shards.len()
    );
    let mut got: Option<std::result::Result<Sample, String>> = None;
    read_shard(set, r.shard, r.offset, true, &mut |ev| {
        Ok(match ev {
            Event::Sample(s, _) => {
                got = Some(Ok(s));
                Flow::Stop
            }
            Event::Skip(p, why) => {
                got = Some(Err(format!("{p}: {why}")));
                Flow::Stop
            }
            // Within the sample (reported when it was first read): go on
            // to the sample.
            Event::SkipMember(..) => Flow::Go,
        })
    })?;
    let shard = set.shards[r.shard].display();
    match got {
        Some(Ok(s)) if s.key == r.key => Ok(s),
        Some(Ok(s)) => bail!(
            "resuming the data stream: {shard} holds sample {} at byte {}, not {} (was the shard rewritten?)",
            s.key,
            r.offset,
            r.key
        ),
        Some(Err(e)) => bail!(
            "resuming the data stream: sample {} of {shard} at byte {} cannot be read again: {e}",
            r.key,
            r.offset
        ),
        None => bail!(
            "resuming the data stream: {shard} has no sample at byte {} (was it rewritten?)",
            r.offset
        ),
    }
}

/// One epoch of a rank's stream, from its start or from `from`: the
/// samples in order and a snapshot every `cfg.snapshot_every`, given to
/// `out` with the stream's counters (`out` returns false to stop). Ends
/// with [`StreamOut::End`] unless stopped.
pub fn run_stream(
    set: &ShardSet,
    cfg: &StreamConfig,
    from: Option<&Snapshot>,
    out: &mut dyn FnMut(StreamOut, &StreamStats) -> Result<bool>,
) -> Result<StreamStats> {
    ensure!(!set.shards.is_empty(), "no shards to read");
    ensure!(
        set.shards.len() >= cfg.world,
        "{} shard(s) for {} ranks: every rank needs at least one shard ({})",
        set.shards.len(),
        cfg.world,
        set.spec
    );
    let order = rank_shards(set.shards.len(), cfg);
    let snap = match from {
        Some(s) => {
            ensure!(
                s.epoch == cfg.epoch && s.rank == cfg.rank && s.world == cfg.world,
                "the data stream state is of epoch {} rank {} of {}, not epoch {} rank {} of {}",
                s.epoch,
                s.rank,
                s.world,
                cfg.epoch,
                cfg.rank,
                cfg.world
            );
            ensure!(
                s.shard <= order.len() && s.buffer.len() <= cfg.shuffle_buffer.max(1),
                "the data stream state does not fit this data set ({} shards for this rank, buffer {})",
                order.len(),
                cfg.shuffle_buffer
            );
            s.clone()
        }
        None => Snapshot::start(cfg),
    };
    let mut st = Streamer {
        cfg,
        order,
        rng: SplitMix64(snap.rng),
        buffer: Vec::new(),
        snap,
        pending_skips: Vec::new(),
        stats: StreamStats::default(),
        out,
        done: false,
    };
    for r in st.snap.buffer.clone() {
        st.buffer.push(read_back(set, &r)?);
        st.stats.read += 1;
    }
    st.stats.max_buffered = st.buffer.len();
    if st.cfg.max_samples.is_some_and(|m| st.snap.emitted >= m) {
        st.done = true;
    }
    while !st.done && st.snap.shard < st.order.len() {
        let idx = st.order[st.snap.shard];
        let offset = st.snap.offset;
        let flow = match read_shard(set, idx, offset, true, &mut |ev| st.on_event(ev)) {
            Ok(f) => f,
            Err(e) => {
                // A shard that cannot be opened any more: skipped.
                st.on_event(Event::Skip(
                    set.shards[idx].display().to_string(),
                    format!("{e:#}"),
                ))?
            }
        };
        if flow == Flow::Stop || st.done {
            break;
        }
        st.snap.shard += 1;
        st.snap.offset = 0;
    }
    while !st.done && !st.buffer.is_empty() {
        let k = st.rng.below(st.buffer.len() as u64) as usize;
        let s = st.buffer.swap_remove(k);
        st.emit(s)?;
    }
    let stopped_early = st.done && st.cfg.max_samples.is_none_or(|m| st.snap.emitted < m);
    if !stopped_early {
        let skipped = std::mem::take(&mut st.pending_skips);
        let stats = st.stats;
        (st.out)(StreamOut::End { skipped }, &stats)?;
    }
    Ok(st.stats)
}

// ---------------------------------------------------------------------------
// The loader: the stream on a reader thread, pictures decoded on workers,
// batches assembled in order.

/// Snapshots a loader's stream has taken, oldest first.
#[derive(Default)]
struct Snapshots {
    list: VecDeque<Snapshot>,
}

impl Snapshots {
    fn latest_at(&self, position: u64) -> Option<&Snapshot> {
        self.list.iter().rev().find(|s| s.emitted <= position)
    }

    /// Drop those no resume at or after `position` needs.
    fn prune(&mut self, position: u64) {
        while self.list.len() >= 2 && self.list[1].emitted <= position {
            self.list.pop_front();
        }
    }
}

struct Decoded {
    pixels: std::result::Result<Vec<f32>, String>,
    caption: String,
    place: String,
    id: u64,
    skipped: Vec<(String, String)>,
}

struct Raw {
    seq: u64,
    image: Vec<u8>,
    caption: String,
    place: String,
    id: u64,
    skipped: Vec<(String, String)>,
}

#[derive(Default)]
struct LoadState {
    queue: VecDeque<Raw>,
    results: BTreeMap<u64, Decoded>,
    /// Samples (from the start position) the reader has queued.
    produced: u64,
    /// The assembler has taken every result below this.
    consumed: u64,
    /// The stream's end: its sample count, and what was skipped after
    /// its last sample.
    end: Option<(u64, Vec<(String, String)>)>,
    error: Option<String>,
    stats: StreamStats,
    shutdown: bool,
}

struct LoadShared {
    state: Mutex<LoadState>,
    changed: Condvar,
    snapshots: Mutex<Snapshots>,
}

impl LoadShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, LoadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wait<'a>(
        &self,
        g: std::sync::MutexGuard<'a, LoadState>,
    ) -> std::sync::MutexGuard<'a, LoadState> {
        self.changed.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

enum Msg {
    Batch(LoadedBatch, u64),
    End(u64),
    Err(anyhow::Error),
}

/// Batches of a rank's stream of one epoch, made on background threads as
/// [`crate::data::loader::Loader`] makes them from a list: the same
/// [`LoadedBatch`]es (a picture that fails to decode is skipped and the
/// batch filled from the next samples; broken samples and shard ends are
/// reported in [`LoadedBatch::skipped`] too), the same for any number of
/// workers. [`StreamLoader::position`] counts the samples the returned
/// batches used; [`StreamLoader::resume_point`] gives what a new loader
/// needs to go on from there.
pub struct StreamLoader {
    rx: Option<Receiver<Msg>>,
    shared: Arc<LoadShared>,
    threads: Vec<JoinHandle<()>>,
    position: u64,
    /// Resume points older than `position - keep_back` are dropped.
    keep_back: u64,
    finished: bool,
    failed: bool,
}

impl StreamLoader {
    /// Start reading `set` as `cfg` says, from `resume` (a snapshot and the
    /// position to go on from) or from the epoch's start. `keep_back`:
    /// positions this far behind the latest batch can still be resumed
    /// from (an accumulation group's pictures decoded again).
    pub fn new(
        set: Arc<ShardSet>,
        cfg: StreamConfig,
        resume: Option<ResumePoint>,
        loader: LoaderConfig,
        processor: ImageProcessorConfig,
        tokenizer: Arc<TextTokenizer>,
        keep_back: usize,
    ) -> Result<StreamLoader> {
        ensure!(loader.batch_size > 0, "batch size must be at least 1");
        if !processor.do_center_crop && (!processor.do_resize || processor.resize_to.is_none()) {
            bail!(
                "batches need one picture size, but this image processor neither center-crops \
                 (do_center_crop) nor resizes to a fixed height and width"
            );
        }
        let (from, start) = match resume {
            Some(r) => {
                ensure!(
                    r.position >= r.snapshot.emitted,
                    "the data stream state's position {} is before its snapshot ({})",
                    r.position,
                    r.snapshot.emitted
                );
                (r.snapshot, r.position)
            }
            None => (Snapshot::start(&cfg), 0),
        };
        let (h, w) = processor.output_hw(1, 1);
        let pixel_len = 3 * h * w;
        let workers = loader.workers.max(1);
        let window = (loader.batch_size + 2 * workers) as u64;
        let shared = Arc::new(LoadShared {
            state: Mutex::new(LoadState {
                produced: start,
                consumed: start,
                ..LoadState::default()
            }),
            changed: Condvar::new(),
            snapshots: Mutex::new(Snapshots {
                list: VecDeque::from([from.clone()]),
            }),
        });
        let mut threads = Vec::new();
        {
            let (shared, set) = (shared.clone(), set.clone());
            let cfg = cfg.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("clip-wds-reader".into())
                    .spawn(move || read_thread(&shared, &set, &cfg, from, start, window))?,
            );
        }
        let processor = Arc::new(processor);
        for k in 0..workers {
            let (shared, processor) = (shared.clone(), processor.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("clip-wds-decode-{k}"))
                    .spawn(move || decode_thread(&shared, &processor, pixel_len))?,
            );
        }
        let (tx, rx) = sync_channel(loader.prefetch.max(1));
        {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("clip-wds-batches".into())
                    .spawn(move || assemble(&shared, start, &loader, pixel_len, &tokenizer, &tx))?,
            );
        }
        Ok(StreamLoader {
            rx: Some(rx),
            shared,
            threads,
            position: start,
            keep_back: keep_back as u64,
            finished: false,
            failed: false,
        })
    }

    /// The next batch, or None at the end of the epoch.
    pub fn next_batch(&mut self) -> Result<Option<LoadedBatch>> {
        if self.finished {
            return Ok(None);
        }
        if self.failed {
            bail!("the data loader stopped after an earlier error");
        }
        let msg = self.rx.as_ref().and_then(|rx| rx.recv().ok());
        match msg {
            Some(Msg::Batch(b, end)) => {
                self.position = end;
                let mut s = self
                    .shared
                    .snapshots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                s.prune(end.saturating_sub(self.keep_back));
                Ok(Some(b))
            }
            Some(Msg::End(end)) => {
                self.position = end;
                self.finished = true;
                Ok(None)
            }
            Some(Msg::Err(e)) => {
                self.failed = true;
                Err(e)
            }
            None => {
                self.failed = true;
                bail!("the data loader's batch thread stopped unexpectedly (a panic?)")
            }
        }
    }

    /// Samples of the epoch the returned batches used (from its start).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// What a new loader needs to go on from `position` (one the returned
    /// batches reached, not older than `keep_back` behind the latest).
    pub fn resume_point(&self, position: u64) -> Option<ResumePoint> {
        let s = self
            .shared
            .snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.latest_at(position).map(|snap| ResumePoint {
            snapshot: snap.clone(),
            position,
        })
    }

    /// The stream's counters so far (it reads ahead of the batches).
    pub fn stats(&self) -> StreamStats {
        self.shared.lock().stats
    }

    /// Drop the resume points no position at or after `position` needs.
    pub fn forget_before(&self, position: u64) {
        let mut s = self
            .shared
            .snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.prune(position);
    }

    /// A handle that finds resume points while the loader is borrowed
    /// elsewhere.
    pub fn resume_points(&self) -> ResumePoints {
        ResumePoints(self.shared.clone())
    }
}

/// [`StreamLoader::resume_point`] through a shared handle.
#[derive(Clone)]
pub struct ResumePoints(Arc<LoadShared>);

impl ResumePoints {
    pub fn at(&self, position: u64) -> Option<ResumePoint> {
        let s = self.0.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        s.latest_at(position).map(|snap| ResumePoint {
            snapshot: snap.clone(),
            position,
        })
    }
}

impl Drop for StreamLoader {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        drop(self.rx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_thread(
    shared: &LoadShared,
    set: &ShardSet,
    cfg: &StreamConfig,
    from: Snapshot,
    start: u64,
    window: u64,
) {
    let mut out = |o: StreamOut, stats: &StreamStats| -> Result<bool> {
        match o {
            StreamOut::Snapshot(s) => {
                shared
                    .snapshots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .list
                    .push_back(s);
                Ok(true)
            }
            StreamOut::Sample {
                seq,
                sample,
                skipped,
            } => {
                let mut st = shared.lock();
                st.stats = *stats;
                if seq < start {
                    // Replayed up to the resume position: already used.
                    return Ok(!st.shutdown);
                }
                while !st.shutdown && st.produced >= st.consumed + window {
                    st = shared.wait(st);
                }
                if st.shutdown {
                    return Ok(false);
                }
                let place = sample.place(set);
                st.queue.push_back(Raw {
                    seq,
                    id: ((sample.shard as u64) << 40) ^ sample.offset,
                    image: sample.image,
                    caption: sample.caption,
                    place,
                    skipped,
                });
                st.produced = seq + 1;
                drop(st);
                shared.changed.notify_all();
                Ok(true)
            }
            StreamOut::End { skipped } => {
                let mut st = shared.lock();
                st.stats = *stats;
                let produced = st.produced;
                st.end = Some((produced, skipped));
                drop(st);
                shared.changed.notify_all();
                Ok(true)
            }
        }
    };
    let r = catch_quietly(|| run_stream(set, cfg, Some(&from), &mut out));
    let err = match r {
        Ok(Ok(stats)) => {
            let mut st = shared.lock();
            st.stats = stats;
            if st.end.is_none() {
                // Stopped at --max_train_samples (or shut down).
                let produced = st.produced;
                st.end = Some((produced, Vec::new()));
            }
            None
        }
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(p) => Some(format!("the shard reader panicked: {p}")),
    };
    let mut st = shared.lock();
    if let Some(e) = err {
        st.error = Some(e);
    }
    drop(st);
    shared.changed.notify_all();
}

fn decode_thread(shared: &LoadShared, processor: &ImageProcessorConfig, pixel_len: usize) {
    loop {
        let raw = {
            let mut st = shared.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(r) = st.queue.pop_front() {
                    break r;
                }
                if st.end.is_some() || st.error.is_some() {
                    return;
                }
                st = shared.wait(st);
            }
        };
        let r = catch_quietly(|| {
            let img = decode_image(&raw.image).map_err(|e| format!("{e:#}"))?;
            preprocess(&img, processor).map_err(|e| format!("{e:#}"))
        });
        let pixels = match r {
            Ok(Ok(px)) if px.len() == pixel_len => Ok(px),
            Ok(Ok(px)) => Err(format!(
                "preprocessed to {} values, expected {pixel_len}",
                px.len()
            )),
            Ok(Err(e)) => Err(e),
            Err(why) => Err(format!("the image decoder panicked on this file: {why}")),
        };
        let d = Decoded {
            pixels,
            caption: raw.caption,
            place: raw.place,
            id: raw.id,
            skipped: raw.skipped,
        };
        shared.lock().results.insert(raw.seq, d);
        shared.changed.notify_all();
    }
}

fn assemble(
    shared: &LoadShared,
    start: u64,
    cfg: &LoaderConfig,
    pixel_len: usize,
    tokenizer: &TextTokenizer,
    tx: &SyncSender<Msg>,
) {
    let mut pos = start;
    let mut loaded_any = false;
    let mut sent_any = false;
    let mut failures: Vec<(PathBuf, String)> = Vec::new();
    loop {
        let mut pixels = Vec::with_capacity(cfg.batch_size * pixel_len);
        let mut captions: Vec<String> = Vec::with_capacity(cfg.batch_size);
        let mut ids = Vec::with_capacity(cfg.batch_size);
        let mut positions = Vec::with_capacity(cfg.batch_size);
        let mut skipped: Vec<(PathBuf, String)> = Vec::new();
        let mut at_end = false;
        let batch_start = pos;
        while (if cfg.refill {
            captions.len()
        } else {
            (pos - batch_start) as usize
        }) < cfg.batch_size
        {
            let item = {
                let mut st = shared.lock();
                loop {
                    if st.shutdown {
                        return;
                    }
                    if let Some(d) = st.results.remove(&pos) {
                        break Some(d);
                    }
                    if let Some(e) = &st.error {
                        let e = anyhow!("reading the WebDataset shards: {e}");
                        drop(st);
                        let _ = tx.send(Msg::Err(e));
                        return;
                    }
                    if let Some((n, rest)) = &mut st.end {
                        if pos >= *n {
                            skipped.extend(rest.drain(..).map(|(p, r)| (PathBuf::from(p), r)));
                            break None;
                        }
                    }
                    st = shared.wait(st);
                }
            };
            let Some(d) = item else {
                at_end = true;
                break;
            };
            {
                let mut st = shared.lock();
                st.consumed = pos + 1;
            }
            shared.changed.notify_all();
            skipped.extend(d.skipped.into_iter().map(|(p, r)| (PathBuf::from(p), r)));
            match d.pixels {
                Ok(px) => {
                    pixels.extend_from_slice(&px);
                    captions.push(d.caption);
                    ids.push(d.id);
                    positions.push(pos as usize);
                    loaded_any = true;
                }
                Err(reason) => {
                    let path = PathBuf::from(&d.place);
                    if !loaded_any {
                        failures.push((path.clone(), reason.clone()));
                        if failures.len() >= GIVE_UP_AFTER {
                            let _ = tx.send(Msg::Err(none_loaded(&failures)));
                            return;
                        }
                    }
                    skipped.push((path, reason));
                }
            }
            pos += 1;
        }
        let short = captions.len() < cfg.batch_size;
        if captions.is_empty() || (at_end && cfg.drop_last && short) {
            let msg = if !loaded_any && !failures.is_empty() {
                Msg::Err(none_loaded(&failures))
            } else if !sent_any && start == 0 && !captions.is_empty() {
                Msg::Err(anyhow!(
                    "no batch of {} can be made: the stream gave only {} readable samples, and \
                     drop_last (--dataloader_drop_last) drops the smaller last batch",
                    cfg.batch_size,
                    captions.len()
                ))
            } else if !sent_any && start == 0 && !loaded_any {
                Msg::Err(anyhow!(
                    "the WebDataset shards hold no usable sample{}",
                    skipped
                        .first()
                        .map(|(p, r)| format!(" (the first thing skipped: {}: {r})", p.display()))
                        .unwrap_or_default()
                ))
            } else {
                Msg::End(pos)
            };
            let _ = tx.send(msg);
            return;
        }
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let encoded = catch_quietly(|| tokenizer.encode_batch(&refs, cfg.max_len))
            .unwrap_or_else(|why| Err(anyhow!("the tokenizer panicked: {why}")));
        let (tok, mask) = match encoded {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Msg::Err(e.context("tokenizing a batch of captions")));
                return;
            }
        };
        let batch = LoadedBatch {
            pixels,
            ids: tok,
            mask,
            batch: captions.len(),
            image_ids: ids,
            positions,
            skipped,
        };
        if tx.send(Msg::Batch(batch, pos)).is_err() {
            return;
        }
        sent_any = true;
        if at_end {
            let _ = tx.send(Msg::End(pos));
            return;
        }
    }
}

fn none_loaded(failures: &[(PathBuf, String)]) -> anyhow::Error {
    let mut s = format!(
        "none of the first {} pictures of the WebDataset stream could be decoded",
        failures.len()
    );
    for (p, r) in failures.iter().take(3) {
        s.push_str(&format!("\n  {}: {r}", p.display()));
    }
    anyhow!(s)
}
