//! Where training examples come from: captioned image lists read from the
//! layouts `run_clip.py` users have on disk.
//!
//! - [`coco`]: COCO 2017 captions (`annotations/captions_{train,val}2017.json`
//!   and `{train,val}2017/`), one example per caption in annotation order, as
//!   the `ydshieh/coco_dataset_script` "2017" config that the transformers
//!   example uses gives them.
//! - [`table`]: a CSV or JSON-lines file with an image-path column and a
//!   caption column (`run_clip.py --train_file`, `--image_column`,
//!   `--caption_column`).
//! - [`sidecar_folder`]: a folder tree of pictures, each with a `NAME.txt`
//!   caption beside it (Tux Paint's stamps, many scraped datasets).
//! - [`split_holdout`]: a validation split that keeps every image (all its
//!   captions) on one side.
//!
//! Each reader returns a [`Dataset`]: the examples, and the entries it left
//! out with where and why (an empty caption, an annotation of an unknown
//! image, a picture without its `.txt`), so the caller can report them.
//! Image files are not opened here; the loader skips unreadable ones.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Where an example's picture comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ImageSource {
    /// An image file (any format [`crate::data::load_image`] reads).
    File(PathBuf),
    /// A picture of the built-in demo dataset: the seed of
    /// [`crate::data::demo::render`].
    Demo(u64),
    /// A member of a WebDataset shard: its name, and the byte offset of its
    /// headers in the tar file ([`crate::data::webdataset::load_member`]).
    TarMember {
        shard: PathBuf,
        offset: u64,
        member: String,
    },
}

impl ImageSource {
    /// A path for messages: the file, or `demo:<seed>`.
    pub fn display_path(&self) -> PathBuf {
        match self {
            ImageSource::File(p) => p.clone(),
            ImageSource::Demo(s) => PathBuf::from(format!("demo:{s}")),
            ImageSource::TarMember { shard, member, .. } => {
                PathBuf::from(format!("{}:{member}", shard.display()))
            }
        }
    }
}

/// One (image, caption) pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub image: ImageSource,
    pub caption: String,
    /// The same for every caption of one image: retrieval metrics count a
    /// caption of the right image as a hit, and [`split_holdout`] keeps an
    /// image's captions together.
    pub image_id: u64,
}

/// An entry a reader left out, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    /// `file:line` for tables, `file: annotations[i]` for COCO, the picture's
    /// path for sidecar folders.
    pub place: String,
    pub reason: String,
}

/// What a reader found: the examples, and what it left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub skipped: Vec<Skipped>,
}

impl Dataset {
    /// Number of distinct images.
    pub fn num_images(&self) -> usize {
        let mut ids: Vec<u64> = self.examples.iter().map(|e| e.image_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// A one-paragraph note on the skipped entries (count and the first
    /// few), or None when nothing was skipped. `what` names the source.
    pub fn skip_summary(&self, what: &str) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let mut s = format!(
            "{what}: skipped {} entr{} ({} examples kept)",
            self.skipped.len(),
            if self.skipped.len() == 1 { "y" } else { "ies" },
            self.examples.len()
        );
        for k in self.skipped.iter().take(5) {
            s.push_str(&format!("\n  {}: {}", k.place, k.reason));
        }
        if self.skipped.len() > 5 {
            s.push_str(&format!("\n  ... and {} more", self.skipped.len() - 5));
        }
        Some(s)
    }
}

/// A COCO split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    /// The name COCO's files use: `train` or `val`.
    pub fn coco_name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "val",
        }
    }
}

/// COCO 2017 captions: `<data_dir>/annotations/captions_{train,val}2017.json`
/// with the pictures in `<data_dir>/{train,val}2017/<file_name>`. One example
/// per caption, in the order of the `"annotations"` list, `image_id` from
/// COCO (the `ydshieh/coco_dataset_script` "2017" config). Annotations of an
/// image id missing from `"images"`, and empty captions, are skipped and
/// reported; a missing file, bad JSON or a malformed `"images"` entry is an
/// error.
pub fn coco(data_dir: &Path, split: Split) -> Result<Dataset> {
    let name = split.coco_name();
    let ann_path = data_dir
        .join("annotations")
        .join(format!("captions_{name}2017.json"));
    let image_dir = data_dir.join(format!("{name}2017"));
    if !ann_path.is_file() {
        bail!(
            "COCO captions file {} does not exist. Expected the COCO 2017 layout: \
             <dir>/annotations/captions_{{train,val}}2017.json (from annotations_trainval2017.zip) \
             and the pictures in <dir>/{{train,val}}2017/ (from train2017.zip, val2017.zip)",
            ann_path.display()
        );
    }
    if !image_dir.is_dir() {
        bail!(
            "COCO image folder {} does not exist (unpack {name}2017.zip into {}); the captions \
             file {} refers to pictures there",
            image_dir.display(),
            data_dir.display(),
            ann_path.display()
        );
    }
    let bytes =
        std::fs::read(&ann_path).with_context(|| format!("reading {}", ann_path.display()))?;
    let root: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("parsing {} as JSON", ann_path.display()))?;
    let file = ann_path.display();
    let obj = root
        .as_object()
        .with_context(|| format!("{file}: expected a JSON object at the top level"))?;
    let list = |key: &str| -> Result<&Vec<Value>> {
        let v = obj.get(key).with_context(|| {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            format!(
                "{file}: no \"{key}\" list (top-level keys: {}); is this a COCO captions file?",
                keys.join(", ")
            )
        })?;
        v.as_array()
            .with_context(|| format!("{file}: \"{key}\" must be a list"))
    };
    let images = list("images")?;
    let annotations = list("annotations")?;

    let mut file_of: HashMap<u64, &str> = HashMap::with_capacity(images.len());
    for (i, im) in images.iter().enumerate() {
        let id = im.get("id").and_then(Value::as_u64).with_context(|| {
            format!(
                "{file}: images[{i}] has no integer \"id\": {}",
                clip_json(im)
            )
        })?;
        let name = im
            .get("file_name")
            .and_then(Value::as_str)
            .with_context(|| {
                format!(
                    "{file}: images[{i}] has no string \"file_name\": {}",
                    clip_json(im)
                )
            })?;
        file_of.insert(id, name);
    }

    let mut out = Dataset::default();
    out.examples.reserve(annotations.len());
    for (i, a) in annotations.iter().enumerate() {
        let place = || format!("{file}: annotations[{i}]");
        let Some(image_id) = a.get("image_id").and_then(Value::as_u64) else {
            out.skipped.push(Skipped {
                place: place(),
                reason: "no integer \"image_id\"".into(),
            });
            continue;
        };
        let Some(name) = file_of.get(&image_id) else {
            out.skipped.push(Skipped {
                place: place(),
                reason: format!("image_id {image_id} is not in \"images\""),
            });
            continue;
        };
        let caption = match a.get("caption") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => {
                out.skipped.push(Skipped {
                    place: place(),
                    reason: "empty caption".into(),
                });
                continue;
            }
            other => {
                out.skipped.push(Skipped {
                    place: place(),
                    reason: format!(
                        "\"caption\" is {}, not text",
                        other.map_or("missing".to_string(), clip_json)
                    ),
                });
                continue;
            }
        };
        out.examples.push(Example {
            image: ImageSource::File(image_dir.join(name)),
            caption,
            image_id,
        });
    }
    Ok(out)
}

/// A short rendering of a JSON value for messages.
fn clip_json(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let t: String = s.chars().take(77).collect();
        format!("{t}...")
    } else {
        s
    }
}

/// A table of image paths and captions: CSV with a header row (`.csv`), or
/// JSON (`.json`, `.jsonl`): one object per line (blank lines ignored), or a
/// single JSON array of objects when the file starts with `[`.
///
/// - Relative image paths resolve against the table file's folder.
/// - `image_id` numbers the distinct image paths in order of first
///   appearance, so all captions of one picture share it.
/// - Captions: numbers and booleans become text; a JSON list of strings
///   gives one example per string (several captions of one image); null,
///   empty or whitespace-only captions, and rows with an empty or non-text
///   image path, are skipped and reported in [`Dataset::skipped`] with their
///   line (`file:line`).
/// - Errors: a column that no row has (the message lists the columns there
///   are), a CSV row whose field count differs from the header's, a line that
///   is not a JSON object, an unterminated quote, non-UTF-8 text; each names
///   the file and line.
pub fn table(file: &Path, image_column: &str, caption_column: &str) -> Result<Dataset> {
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            bail!("{}:{line}: the text is not UTF-8", file.display());
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rows = match ext.as_str() {
        "csv" => csv_rows(file, text)?,
        "json" | "jsonl" => json_rows(file, text)?,
        _ => bail!(
            "{}: unknown table format {:?}; use .csv (with a header row), .json or .jsonl \
             (one JSON object per line)",
            file.display(),
            ext
        ),
    };
    let dir = file.parent().unwrap_or(Path::new("")).to_path_buf();
    rows_to_dataset(file, &dir, rows, image_column, caption_column)
}

/// A row of a table: its line and its named cells.
struct Rows {
    /// Column names in order of first appearance.
    columns: Vec<String>,
    rows: Vec<(usize, HashMap<String, Value>)>,
}

fn rows_to_dataset(
    file: &Path,
    dir: &Path,
    t: Rows,
    image_column: &str,
    caption_column: &str,
) -> Result<Dataset> {
    for col in [image_column, caption_column] {
        if !t.columns.iter().any(|c| c == col) {
            let near: Vec<&String> = t
                .columns
                .iter()
                .filter(|c| c.trim().eq_ignore_ascii_case(col.trim()))
                .collect();
            let hint = match near.first() {
                Some(n) => format!(" (did you mean {n:?}?)"),
                None => String::new(),
            };
            let names: Vec<String> = t.columns.iter().map(|c| format!("{c:?}")).collect();
            bail!(
                "{}: no column {col:?}{hint}; the columns are: {}",
                file.display(),
                if names.is_empty() {
                    "(none; the table is empty)".to_string()
                } else {
                    names.join(", ")
                }
            );
        }
    }
    let mut out = Dataset::default();
    let mut ids: HashMap<PathBuf, u64> = HashMap::new();
    for (line, row) in t.rows {
        let place = format!("{}:{line}", file.display());
        let path = match row.get(image_column) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) | Some(Value::Null) | None => {
                out.skipped.push(Skipped {
                    place,
                    reason: format!("empty image path ({image_column:?})"),
                });
                continue;
            }
            Some(v) => {
                out.skipped.push(Skipped {
                    place,
                    reason: format!(
                        "image path ({image_column:?}) is {}, not text",
                        clip_json(v)
                    ),
                });
                continue;
            }
        };
        let captions: Vec<String> = match row.get(caption_column) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Number(n)) => vec![n.to_string()],
            Some(Value::Bool(b)) => vec![b.to_string()],
            Some(Value::Null) | None => vec![String::new()],
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
            Some(v) => {
                out.skipped.push(Skipped {
                    place,
                    reason: format!("caption ({caption_column:?}) is {}, not text", clip_json(v)),
                });
                continue;
            }
        };
        let full = dir.join(&path);
        let next = ids.len() as u64;
        let mut image_id = None;
        for caption in captions {
            if caption.trim().is_empty() {
                out.skipped.push(Skipped {
                    place: place.clone(),
                    reason: format!("empty caption ({caption_column:?})"),
                });
                continue;
            }
            let id = *image_id.get_or_insert_with(|| *ids.entry(full.clone()).or_insert(next));
            out.examples.push(Example {
                image: ImageSource::File(full.clone()),
                caption,
                image_id: id,
            });
        }
    }
    Ok(out)
}

fn json_rows(file: &Path, text: &str) -> Result<Rows> {
    let mut columns: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    let mut add = |line: usize, v: Value, what: &str| -> Result<()> {
        let Value::Object(map) = v else {
            bail!(
                "{}:{line}: {what} is {}, not a JSON object",
                file.display(),
                clip_json(&v)
            );
        };
        for k in map.keys() {
            if !columns.iter().any(|c| c == k) {
                columns.push(k.clone());
            }
        }
        rows.push((line, map.into_iter().collect()));
        Ok(())
    };
    if text.trim_start().starts_with('[') {
        // One JSON array of objects (what `datasets`' json loader also reads).
        let items: Vec<Value> = serde_json::from_str(text)
            .with_context(|| format!("{}: parsing the JSON array of rows", file.display()))?;
        // Lines are not known inside one document; number rows from 1.
        for (i, item) in items.into_iter().enumerate() {
            add(i + 1, item, "array element")?;
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}: not a JSON object ({e}); JSON lines files need one object per line",
                    file.display(),
                    i + 1
                )
            })?;
            add(i + 1, v, "the line")?;
        }
    }
    Ok(Rows { columns, rows })
}

fn csv_rows(file: &Path, text: &str) -> Result<Rows> {
    let records = parse_csv(text)
        .map_err(|(line, msg)| anyhow::anyhow!("{}:{line}: {msg}", file.display()))?;
    let mut it = records.into_iter();
    let Some((_, header)) = it.next() else {
        return Ok(Rows {
            columns: Vec::new(),
            rows: Vec::new(),
        });
    };
    let mut rows = Vec::new();
    for (line, rec) in it {
        if rec.len() != header.len() {
            bail!(
                "{}:{line}: {} field{}, but the header has {} ({}); quote fields that contain \
                 commas",
                file.display(),
                rec.len(),
                if rec.len() == 1 { "" } else { "s" },
                header.len(),
                header.join(",")
            );
        }
        let mut map = HashMap::new();
        for (k, v) in header.iter().zip(rec) {
            // The first of duplicate column names wins.
            map.entry(k.clone()).or_insert(Value::String(v));
        }
        rows.push((line, map));
    }
    Ok(Rows {
        columns: header,
        rows,
    })
}

/// Rows of a CSV file, each with its line number.
pub type CsvRows = Vec<(usize, Vec<String>)>;

/// RFC 4180 CSV: `,` separated, `"` quoted fields with `""` for a quote,
/// commas and line breaks allowed inside quotes, `\r\n`, `\n` or `\r` line
/// ends. Blank lines are dropped (as pandas does). Like Python's csv module,
/// text after a closing quote is appended to the field, and a quote inside an
/// unquoted field is literal. Returns each record with the line it starts
/// on; errors are (line, message).
pub fn parse_csv(text: &str) -> std::result::Result<CsvRows, (usize, String)> {
    let mut records = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut quoted_any = false; // some field of this row was quoted
    let mut in_quotes = false;
    let mut quote_line = 0;
    let mut at_field_start = true;
    let mut line = 1;
    let mut row_line = 1;
    let mut chars = text.chars().peekable();
    let end_row = |row: &mut Vec<String>,
                   field: &mut String,
                   quoted_any: &mut bool,
                   records: &mut Vec<(usize, Vec<String>)>,
                   row_line: usize| {
        row.push(std::mem::take(field));
        let blank = row.len() == 1 && row[0].is_empty() && !*quoted_any;
        if !blank {
            records.push((row_line, std::mem::take(row)));
        }
        row.clear();
        *quoted_any = false;
    };
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                '\r' => {
                    if chars.peek() != Some(&'\n') {
                        line += 1;
                    }
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            ',' => {
                row.push(std::mem::take(&mut field));
                at_field_start = true;
                continue;
            }
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                end_row(
                    &mut row,
                    &mut field,
                    &mut quoted_any,
                    &mut records,
                    row_line,
                );
                line += 1;
                row_line = line;
                at_field_start = true;
                continue;
            }
            '"' if at_field_start => {
                in_quotes = true;
                quoted_any = true;
                quote_line = line;
            }
            _ => field.push(c),
        }
        at_field_start = false;
    }
    if in_quotes {
        return Err((
            quote_line,
            "a quoted field is never closed (a \" without its closing \")".into(),
        ));
    }
    if !row.is_empty() || !field.is_empty() || quoted_any {
        end_row(
            &mut row,
            &mut field,
            &mut quoted_any,
            &mut records,
            row_line,
        );
    }
    Ok(records)
}

/// Picture extensions [`sidecar_folder`] looks for (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "gif", "bmp"];

/// Pictures with a caption file beside them: every `NAME.png` (`.jpg`,
/// `.jpeg`, `.webp`, `.gif`, `.bmp`, any case) under `dir`, recursively,
/// with `NAME.txt` in the same folder. The caption is the first non-empty
/// line of the `.txt`, trimmed (invalid UTF-8 is replaced, not fatal).
/// Each folder's entries are visited in sorted order (byte order of names;
/// a subfolder is walked where its name sorts), so the result is the same on
/// every machine; `image_id` is the picture's index. Pictures
/// without a `.txt`, or with an empty one, are skipped and reported.
/// Symbolic links to folders are not followed (no cycles).
pub fn sidecar_folder(dir: &Path) -> Result<Dataset> {
    if !dir.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    let mut out = Dataset::default();
    walk_sidecar(dir, &mut out)?;
    Ok(out)
}

fn walk_sidecar(dir: &Path, out: &mut Dataset) -> Result<()> {
    let mut entries: Vec<(PathBuf, bool)> = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))? {
        let e = e.with_context(|| format!("reading folder {}", dir.display()))?;
        let ft = e
            .file_type()
            .with_context(|| format!("reading {}", e.path().display()))?;
        let is_dir = ft.is_dir();
        let is_file = ft.is_file() || (ft.is_symlink() && e.path().is_file());
        if is_dir || is_file {
            entries.push((e.path(), is_dir));
        }
    }
    entries.sort_by(|a, b| a.0.file_name().cmp(&b.0.file_name()));
    let files: HashSet<std::ffi::OsString> = entries
        .iter()
        .filter(|e| !e.1)
        .filter_map(|e| e.0.file_name().map(|n| n.to_os_string()))
        .collect();
    for (path, is_dir) in entries {
        if is_dir {
            walk_sidecar(&path, out)?;
            continue;
        }
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
        let Some(stem) = path.file_stem().filter(|_| is_image) else {
            continue;
        };
        let with_ext = |ext: &str| {
            let mut n = stem.to_os_string();
            n.push(ext);
            n
        };
        let Some(txt_name) = [with_ext(".txt"), with_ext(".TXT")]
            .into_iter()
            .find(|n| files.contains(n))
        else {
            out.skipped.push(Skipped {
                place: path.display().to_string(),
                reason: format!("no caption file {}", with_ext(".txt").to_string_lossy()),
            });
            continue;
        };
        let txt = path.with_file_name(txt_name);
        let bytes = std::fs::read(&txt).with_context(|| format!("reading {}", txt.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        match text.lines().map(str::trim).find(|l| !l.is_empty()) {
            Some(caption) => {
                let image_id = out.examples.len() as u64;
                out.examples.push(Example {
                    image: ImageSource::File(path),
                    caption: caption.to_string(),
                    image_id,
                });
            }
            None => out.skipped.push(Skipped {
                place: path.display().to_string(),
                reason: format!("{} is empty", txt.display()),
            }),
        }
    }
    Ok(())
}

/// Split off a validation set of about `fraction` of the images: every
/// caption of an image goes to the same side, the choice depends only on the
/// set of image ids and `seed`, and both sides keep the input order.
/// `round(fraction * images)` images are held out, at least one and at most
/// all but one when `fraction > 0` and there are two or more images;
/// `fraction <= 0` (or NaN) holds out nothing, `fraction >= 1` everything.
pub fn split_holdout(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let mut ids: Vec<u64> = examples.iter().map(|e| e.image_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let n = ids.len();
    let take = if fraction.is_nan() || fraction <= 0.0 {
        0
    } else if fraction >= 1.0 {
        n
    } else {
        let k = (fraction * n as f64).round() as usize;
        if n >= 2 {
            k.clamp(1, n - 1)
        } else {
            k.min(n)
        }
    };
    shuffle(&mut ids, seed ^ 0x5ee_d0f4_f01d);
    let held: HashSet<u64> = ids[..take].iter().copied().collect();
    examples
        .into_iter()
        .partition(|e| !held.contains(&e.image_id))
}

/// splitmix64: a tiny, well-mixed generator with the same output on every
/// platform (only wrapping integer arithmetic).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift (bias below n / 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// splitmix64's output function: a bijective 64-bit hash.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fisher-Yates shuffle driven by [`SplitMix64`] seeded with `seed`.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = SplitMix64(seed);
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}
