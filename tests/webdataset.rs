//! WebDataset shards: brace expansion as the `braceexpand` package does it,
//! WebDataset's key rule, reading shards written here by a reference writer
//! (the `tar` crate's Builder: keys with dots in folders, long names, a
//! sample without caption, one without picture, a duplicate member, a
//! truncated shard, a corrupt picture), the bounded shuffle buffer, exact
//! resume from any position of the stream, shards dealt to ranks, errors
//! that name the file, the threaded loader (same batches for any number of
//! workers, resume), evaluation shards through the ordinary loader, and
//! `train` from shards resumed mid-shard to the weights of an uninterrupted
//! run.
mod common;
use clip_wgpu::data::image::{decode_image, preprocess, ImageProcessorConfig};
use clip_wgpu::data::loader::{LoadedBatch, Loader, LoaderConfig};
use clip_wgpu::data::webdataset::{
    self, expand_braces, expand_shards, index, rank_shards, run_stream, split_key, CaptionRule,
    ResumePoint, ShardSet, Snapshot, StreamConfig, StreamLoader, StreamOut,
};
use clip_wgpu::model::weights::Weights;
use common::cli::{bin, have_gpu, temp, COLOURS};
use common::fixture_model;
use common::loading::{loader_cfg, processor, tokenizer};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

// ---------------------------------------------------------------------------
// Helpers.

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("wds-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small PNG (40 x 34) whose colours depend on `i`, as bytes.
fn png(i: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(40, 34, |x, y| {
        image::Rgb([
            (i * 61 % 256) as u8,
            ((x as usize * 5 + i * 30) % 256) as u8,
            ((y as usize * 7 + i * 13) % 256) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A tar file of `members` (name, bytes) written with the tar crate's
/// Builder (GNU headers; long names get GNU long-name members).
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(f);
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap();
}

fn caption(g: usize) -> String {
    format!("a {} picture number {g}", COLOURS[g % 6])
}

/// `shards` shards of `per` good samples each, keys with dots in their
/// folders (`set.v1/part.{s}/{g:06}`); sample `g` (numbered over all
/// shards) has a PNG, a .txt caption and a .json.
fn good_shards(dir: &Path, shards: usize, per: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for s in 0..shards {
        let mut m = Vec::new();
        for i in 0..per {
            let g = s * per + i;
            let key = format!("set.v1/part.{s}/{g:06}");
            m.push((format!("{key}.png"), png(g)));
            m.push((format!("{key}.txt"), caption(g).into_bytes()));
            m.push((
                format!("{key}.json"),
                serde_json::json!({"caption": caption(g), "alt": format!("alt {g}"), "n": g})
                    .to_string()
                    .into_bytes(),
            ));
        }
        let p = dir.join(format!("{s:05}.tar"));
        write_tar(&p, &m);
        out.push(p);
    }
    out
}

fn set_of(shards: Vec<PathBuf>) -> ShardSet {
    ShardSet {
        shards,
        caption: CaptionRule::TxtThenJson,
        spec: "test".into(),
    }
}

/// One epoch of a stream: each sample's (seq, key, caption), the snapshots
/// taken, the skips, and the stream's counters.
struct Run {
    samples: Vec<(u64, String, String)>,
    snapshots: Vec<Snapshot>,
    skipped: Vec<(String, String)>,
    max_buffered: usize,
}

fn run(set: &ShardSet, cfg: &StreamConfig, from: Option<&Snapshot>) -> Run {
    let mut r = Run {
        samples: Vec::new(),
        snapshots: Vec::new(),
        skipped: Vec::new(),
        max_buffered: 0,
    };
    let stats = run_stream(set, cfg, from, &mut |o, st| {
        // The buffer never holds more than its capacity.
        assert!(st.max_buffered <= cfg.shuffle_buffer.max(1));
        match o {
            StreamOut::Sample {
                seq,
                sample,
                skipped,
            } => {
                r.samples.push((seq, sample.key, sample.caption));
                r.skipped.extend(skipped);
            }
            StreamOut::Snapshot(s) => r.snapshots.push(s),
            StreamOut::End { skipped } => r.skipped.extend(skipped),
        }
        Ok(true)
    })
    .unwrap();
    r.max_buffered = stats.max_buffered;
    r
}

fn all(l: &mut StreamLoader) -> Vec<LoadedBatch> {
    let mut v = Vec::new();
    while let Some(b) = l.next_batch().unwrap() {
        v.push(b);
    }
    v
}

// ---------------------------------------------------------------------------
// Patterns and keys.

#[test]
fn brace_expansion_is_braceexpands() {
    // braceexpand 0.1.7's own test table and doc examples.
    let cases: &[(&str, &[&str])] = &[
        ("{1,2}", &["1", "2"]),
        ("{1}", &["{1}"]),
        ("{1,2{}}", &["1", "2{}"]),
        ("}{", &["}{"]),
        ("a{b,c}d{e,f}", &["abde", "abdf", "acde", "acdf"]),
        ("a{b,c{d,e,}}", &["ab", "acd", "ace", "ac"]),
        ("a{b,{c,{d,e}}}", &["ab", "ac", "ad", "ae"]),
        ("{{a,b},{c,d}}", &["a", "b", "c", "d"]),
        ("{7..10}", &["7", "8", "9", "10"]),
        ("{10..7}", &["10", "9", "8", "7"]),
        ("{1..5..2}", &["1", "3", "5"]),
        ("{5..1..2}", &["5", "3", "1"]),
        ("{07..10}", &["07", "08", "09", "10"]),
        ("{7..010}", &["007", "008", "009", "010"]),
        ("{0..3}", &["0", "1", "2", "3"]),
        ("{2..-1}", &["2", "1", "0", "-1"]),
        ("{-01..1}", &["-01", "000", "001"]),
        ("{a..e}", &["a", "b", "c", "d", "e"]),
        ("{a..e..2}", &["a", "c", "e"]),
        ("{e..a}", &["e", "d", "c", "b", "a"]),
        ("{e..a..2}", &["e", "c", "a"]),
        ("{1..a}", &["{1..a}"]),
        ("{a..1}", &["{a..1}"]),
        ("{1..1}", &["1"]),
        ("{a..a}", &["a"]),
        ("{,}", &["", ""]),
        ("{Z..a}", &["Z", "a"]),
        ("{a..Z}", &["a", "Z"]),
        ("{B..A}", &["B", "A"]),
        ("item{1..3}", &["item1", "item2", "item3"]),
        ("index.html{,.backup}", &["index.html", "index.html.backup"]),
        (
            "python{2.{5..7},3.{2,3}}",
            &[
                "python2.5",
                "python2.6",
                "python2.7",
                "python3.2",
                "python3.3",
            ],
        ),
        // Escapes: the backslash keeps a brace or comma literal and is removed.
        ("{1\\,2}", &["{1,2}"]),
        ("{\\,1,2}", &[",1", "2"]),
        ("\\\\{1,2}", &["\\1", "\\2"]),
        // WebDataset shard names.
        (
            "data/{00000..00003}.tar",
            &[
                "data/00000.tar",
                "data/00001.tar",
                "data/00002.tar",
                "data/00003.tar",
            ],
        ),
        (
            "s-{08..11}.tar",
            &["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"],
        ),
        ("x{0..10..5}", &["x0", "x5", "x10"]),
        ("plain.tar", &["plain.tar"]),
    ];
    for (pattern, want) in cases {
        let got = expand_braces(pattern).unwrap();
        assert_eq!(&got, want, "expanding {pattern:?}");
    }
    let big = expand_braces("data/{00000..00099}.tar").unwrap();
    assert_eq!(big.len(), 100);
    assert_eq!(big[0], "data/00000.tar");
    assert_eq!(big[99], "data/00099.tar");
    // Unbalanced braces are an error naming the pattern.
    // (as in braceexpand 0.1.7, an escaped brace leaves the other unmatched)
    for bad in [
        "{{1,2}", "{1,2}}", "{1},2}", "{1,{2}", "{}1,2}", "{1,2{}", "}{1,2}", "{1,2}{", "\\{1,2}",
        "{1,2\\}",
    ] {
        let e = expand_braces(bad).unwrap_err().to_string();
        assert!(e.contains("unbalanced") && e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn keys_follow_webdatasets_base_plus_ext() {
    let cases: &[(&str, Option<(&str, &str)>)] = &[
        ("000123.jpg", Some(("000123", "jpg"))),
        ("a.b/c.d.jpg", Some(("a.b/c", "d.jpg"))),
        (
            "set.v1/part.2/000001.txt",
            Some(("set.v1/part.2/000001", "txt")),
        ),
        ("x/y/.h.jpg", Some(("x/y/", "h.jpg"))),
        ("/.jpg", Some(("/", "jpg"))),
        ("dir.v1/.hidden.png", None),
        ("noext", None),
        ("a.b/c", None),
        (".jpg", None),
        ("a/b.c/d", None),
        ("k.tar.gz", Some(("k", "tar.gz"))),
        ("a/b.JPG", Some(("a/b", "JPG"))),
    ];
    for (name, want) in cases {
        assert_eq!(split_key(name), *want, "{name}");
    }
}

#[test]
fn shard_lists_globs_and_errors_that_name_the_file() {
    let d = tmp("patterns");
    let shards = good_shards(&d, 4, 1);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let pat = format!("{}/{{00000..00003}}.tar", s(&d));
    assert_eq!(expand_shards(Path::new(&pat)).unwrap(), shards);
    let pat = format!("{}/{{00000..00001}}.tar::{}/0000{{2,3}}.tar", s(&d), s(&d));
    assert_eq!(expand_shards(Path::new(&pat)).unwrap(), shards);
    let pat = format!("{}/*.tar", s(&d));
    assert_eq!(expand_shards(Path::new(&pat)).unwrap(), shards);
    // A list file: relative to its folder, comments and blank lines skipped,
    // patterns allowed.
    let list = d.join("train.shards");
    std::fs::write(&list, "# the shards\n00000.tar\n\n0000{1..3}.tar\n").unwrap();
    assert_eq!(expand_shards(&list).unwrap(), shards);
    for p in [&pat, &s(&list), "x/{0..3}.tar", "x.tar"] {
        assert!(webdataset::is_shard_spec(Path::new(p)), "{p}");
    }
    for p in ["train.csv", "x.jsonl", "d.json", "data[1].csv", "t.txt"] {
        assert!(!webdataset::is_shard_spec(Path::new(p)), "{p}");
    }
    // A missing shard of a range: the error names it.
    let pat = format!("{}/{{00000..00004}}.tar", s(&d));
    let e = format!("{:#}", expand_shards(Path::new(&pat)).unwrap_err());
    assert!(
        e.contains("00004.tar") && e.contains("does not exist"),
        "{e}"
    );
    // A bad pattern: the error names the pattern.
    let pat = format!("{}/{{00000..00003.tar", s(&d));
    let e = format!("{:#}", expand_shards(Path::new(&pat)).unwrap_err());
    assert!(e.contains("unbalanced") && e.contains(&pat), "{e}");
    // A glob that matches nothing.
    let pat = format!("{}/*.nothing.tar", s(&d));
    let e = format!("{:#}", expand_shards(Path::new(&pat)).unwrap_err());
    assert!(
        e.contains("no shard file matches") && e.contains("*.nothing.tar"),
        "{e}"
    );
    // A list file's missing entry: the list and its line.
    std::fs::write(&list, "00000.tar\ngone.tar\n").unwrap();
    let e = format!("{:#}", expand_shards(&list).unwrap_err());
    assert!(
        e.contains("train.shards:2") && e.contains("gone.tar"),
        "{e}"
    );
    // Compressed shards are refused with what to do.
    std::fs::write(d.join("z.tar.gz"), b"x").unwrap();
    let e = format!("{:#}", expand_shards(&d.join("z.tar.gz")).unwrap_err());
    assert!(e.contains("compressed"), "{e}");
    // Through the command line too: the missing shard is named.
    let o = bin()
        .args(["train", "--do_train", "--no_progress", "--output_dir"])
        .arg(d.join("out"))
        .arg("--train_file")
        .arg(format!("{}/{{00000..00009}}.tar", s(&d)))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("00004.tar") && err.contains("--train_file"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Reading.

/// Shards with everything that goes wrong in real ones, and what a reader
/// must make of them: (shard paths, the good samples' keys in shard order).
fn awkward_shards(d: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let long = format!("{}/deep.dir.name/{}", "x".repeat(60), "y".repeat(60));
    let mut a = Vec::new();
    let mut keys = Vec::new();
    fn good(keys: &mut Vec<String>, m: &mut Vec<(String, Vec<u8>)>, key: &str, g: usize) {
        m.push((format!("{key}.png"), png(g)));
        m.push((
            format!("{key}.txt"),
            format!("  {}\n", caption(g)).into_bytes(),
        ));
        keys.push(key.to_string());
    }
    good(&mut keys, &mut a, "f.1/a.b/0001", 1);
    // A directory entry and metadata members are ignored; a name without a
    // key too.
    a.push(("__meta__".into(), b"x".to_vec()));
    a.push(("README".into(), b"no key".to_vec()));
    // No caption at all.
    a.push(("f.1/a.b/0002.png".into(), png(2)));
    // A long name (GNU long-name member) with dots in its folders.
    good(&mut keys, &mut a, &format!("{long}/0003"), 3);
    // No picture: a caption and a .cls only.
    a.push(("f.1/a.b/0004.txt".into(), b"lonely caption".to_vec()));
    a.push(("f.1/a.b/0004.cls".into(), b"7".to_vec()));
    // Caption from the .json when there is no .txt; an extra member.
    a.push(("f.1/a.b/0005.PNG".into(), png(5)));
    a.push((
        "f.1/a.b/0005.json".into(),
        serde_json::json!({"caption": caption(5)})
            .to_string()
            .into_bytes(),
    ));
    a.push(("f.1/a.b/0005.cls".into(), b"3".to_vec()));
    keys.push("f.1/a.b/0005".into());
    // A duplicate member: the first is kept.
    good(&mut keys, &mut a, "f.1/a.b/0006", 6);
    a.push(("f.1/a.b/0006.png".into(), b"second".to_vec()));
    // An empty caption.
    a.push(("f.1/a.b/0007.png".into(), png(7)));
    a.push(("f.1/a.b/0007.txt".into(), b"   \n".to_vec()));
    good(&mut keys, &mut a, "f.1/a.b/0008", 8);
    let pa = d.join("a.tar");
    write_tar(&pa, &a);
    // Shard b: cut in the middle of its fourth sample's picture.
    let mut b = Vec::new();
    for g in 10..16 {
        good(&mut keys, &mut b, &format!("b.x/{g:04}"), g);
    }
    let pb = d.join("b.tar");
    write_tar(&pb, &b);
    let bytes = std::fs::read(&pb).unwrap();
    let mut arch = tar::Archive::new(std::io::Cursor::new(bytes.clone()));
    let cut = arch
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_str() == Some("b.x/0013.png"))
        .map(|e| e.raw_file_position() + 100)
        .unwrap();
    std::fs::write(&pb, &bytes[..cut as usize]).unwrap();
    keys.retain(|k| !["b.x/0013", "b.x/0014", "b.x/0015"].contains(&k.as_str()));
    // Shard c: whole, with a picture that is not one.
    let mut c = Vec::new();
    good(&mut keys, &mut c, "c/0020", 20);
    c.push(("c/0021.jpg".into(), b"not a jpeg at all".to_vec()));
    c.push(("c/0021.txt".into(), caption(21).into_bytes()));
    keys.push("c/0021".into());
    good(&mut keys, &mut c, "c/0022", 22);
    let pc = d.join("c.tar");
    write_tar(&pc, &c);
    (vec![pa, pb, pc], keys)
}

#[test]
fn reads_what_a_reference_writer_wrote_and_skips_the_broken() {
    let d = tmp("awkward");
    let (shards, keys) = awkward_shards(&d);
    let set = set_of(shards.clone());
    // In order (evaluation's reader).
    let idx = index(&set, None).unwrap();
    let got: Vec<String> = idx
        .examples
        .iter()
        .map(|e| match &e.image {
            clip_wgpu::data::sources::ImageSource::TarMember { member, .. } => {
                split_key(member).unwrap().0.to_string()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, keys);
    assert_eq!(idx.examples[0].caption, caption(1), "caption trimmed");
    let five = idx.examples.iter().find(|e| e.caption == caption(5));
    assert!(five.is_some(), "the .json caption of sample 5");
    let reasons: Vec<String> = idx
        .skipped
        .iter()
        .map(|s| format!("{}: {}", s.place, s.reason))
        .collect();
    let has = |what: &str, place: &str| {
        assert!(
            reasons
                .iter()
                .any(|r| r.contains(what) && r.contains(place)),
            "no skip {what:?} at {place:?} in {reasons:#?}"
        )
    };
    has("no caption", "a.tar:f.1/a.b/0002");
    has("no picture", "a.tar:f.1/a.b/0004");
    has("a second .png member", "a.tar:f.1/a.b/0006.png");
    has("no caption", "a.tar:f.1/a.b/0007");
    has("truncated", "b.tar");
    assert_eq!(reasons.len(), 5, "{reasons:#?}");
    // Every indexed picture is read back from its shard.
    for e in &idx.examples {
        let clip_wgpu::data::sources::ImageSource::TarMember {
            shard,
            offset,
            member,
        } = &e.image
        else {
            unreachable!()
        };
        let bytes = webdataset::load_member(shard, *offset, member).unwrap();
        if !member.ends_with(".jpg") {
            decode_image(&bytes).unwrap();
        }
    }
    // Streamed (training's reader) with no shuffling: the same samples in
    // the same order, the same things skipped.
    let mut cfg = StreamConfig::new(1, 0);
    cfg.shuffle_buffer = 1;
    let r = run(&set, &cfg, None);
    let streamed: BTreeSet<String> = r.samples.iter().map(|s| s.1.clone()).collect();
    assert_eq!(streamed, keys.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(r.skipped.len(), 5, "{:#?}", r.skipped);
    // Through the loader: the corrupt picture is skipped and reported like
    // an unreadable file, the batches stay full, every skip is reported.
    let mut l = StreamLoader::new(
        Arc::new(set.clone()),
        cfg.clone(),
        None,
        loader_cfg(3, 2),
        processor(),
        tokenizer(),
        100,
    )
    .unwrap();
    let batches = all(&mut l);
    let n: usize = batches.iter().map(|b| b.batch).sum();
    assert_eq!(n, keys.len() - 1);
    let skipped: Vec<String> = batches
        .iter()
        .flat_map(|b| b.skipped.iter())
        .map(|(p, r)| format!("{}: {r}", p.display()))
        .collect();
    assert_eq!(skipped.len(), 6, "{skipped:#?}");
    assert!(
        skipped.iter().any(|s| s.contains("c.tar:c/0021.jpg")),
        "{skipped:#?}"
    );
    // A caption column other than `caption`: that key of the .json.
    let mut alt = set_of(good_shards(&tmp("alt"), 1, 3));
    alt.caption = CaptionRule::for_column("alt");
    let caps: Vec<String> = index(&alt, None)
        .unwrap()
        .examples
        .into_iter()
        .map(|e| e.caption)
        .collect();
    assert_eq!(caps, ["alt 0", "alt 1", "alt 2"]);
    alt.caption = CaptionRule::for_column("missing");
    let d2 = index(&alt, None).unwrap();
    assert!(d2.examples.is_empty() && d2.skipped.len() == 3);
}

#[test]
fn evaluation_shards_go_through_the_ordinary_loader() {
    let d = tmp("eval");
    let shards = good_shards(&d, 2, 5);
    let set = set_of(shards);
    let ds = index(&set, Some(7)).unwrap();
    assert_eq!(ds.examples.len(), 7, "--max_eval_samples stops the scan");
    let ex = Arc::new(ds.examples);
    let mut l = Loader::new(
        ex.clone(),
        (0..ex.len()).collect(),
        0,
        loader_cfg(4, 2),
        processor(),
        tokenizer(),
    )
    .unwrap();
    let mut k = 0;
    while let Some(b) = l.next_batch().unwrap() {
        assert!(b.skipped.is_empty());
        for i in 0..b.batch {
            let want = preprocess(&decode_image(&png(k)).unwrap(), &processor()).unwrap();
            let n = want.len();
            assert_eq!(b.pixels[i * n..(i + 1) * n], want[..], "picture {k}");
            assert_eq!(ex[b.positions[i]].caption, caption(k));
            k += 1;
        }
    }
    assert_eq!(k, 7);
}

/// Shards with random bytes changed or cut anywhere: reading them never
/// panics or hangs; what cannot be read is skipped or is an error.
#[test]
fn damaged_shards_are_skipped_never_a_crash() {
    let d = tmp("damaged");
    let good = good_shards(&d, 1, 6).remove(0);
    let bytes = std::fs::read(&good).unwrap();
    let mut rng = common::Rng::new(99);
    let victim = d.join("v.tar");
    for round in 0..300 {
        let mut b = bytes.clone();
        match round % 3 {
            0 => b.truncate(rng.below(b.len())),
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(b.len());
                    b[i] = rng.next_u64() as u8;
                }
            }
            _ => {
                // A header field: sizes, checksums, names.
                let block = rng.below(b.len() / 512) * 512;
                let i = block + rng.below(160);
                b[i] = rng.next_u64() as u8;
            }
        }
        std::fs::write(&victim, &b).unwrap();
        let set = set_of(vec![victim.clone()]);
        let _ = index(&set, None);
        let mut cfg = StreamConfig::new(round as u64, 0);
        cfg.shuffle_buffer = 3;
        let _ = run_stream(&set, &cfg, None, &mut |_, _| Ok(true));
    }
}

// ---------------------------------------------------------------------------
// The stream.

#[test]
fn shuffle_buffer_is_bounded_and_the_stream_is_a_seeded_permutation() {
    let d = tmp("shuffle");
    let set = set_of(good_shards(&d, 6, 9));
    let keys: BTreeSet<String> = index(&set, None)
        .unwrap()
        .examples
        .iter()
        .map(|e| e.caption.clone())
        .collect();
    for buffer in [1usize, 4, 10, 100] {
        let mut cfg = StreamConfig::new(3, 0);
        cfg.shuffle_buffer = buffer;
        let a = run(&set, &cfg, None);
        // Never more than the buffer (asserted at every sample in `run`),
        // and filled up to it.
        assert_eq!(a.max_buffered, buffer.min(54));
        let caps: Vec<String> = a.samples.iter().map(|s| s.2.clone()).collect();
        assert_eq!(caps.iter().cloned().collect::<BTreeSet<_>>(), keys);
        assert_eq!(caps.len(), 54, "each sample once");
        let seqs: Vec<u64> = a.samples.iter().map(|s| s.0).collect();
        assert_eq!(seqs, (0..54).collect::<Vec<u64>>());
        // The same seed and epoch: the same stream.
        assert_eq!(run(&set, &cfg, None).samples, a.samples);
        // Another epoch: another order.
        cfg.epoch = 1;
        assert_ne!(run(&set, &cfg, None).samples, a.samples);
        if buffer == 1 {
            // No shuffling within shards: each shard's samples in order.
            for w in a.samples.windows(2) {
                let (k0, k1) = (&w[0].1, &w[1].1);
                if k0.rsplit_once('/').unwrap().0 == k1.rsplit_once('/').unwrap().0 {
                    assert!(k0 < k1);
                }
            }
        }
    }
    // Memory stays flat however many shards: with a buffer of 8 over 54
    // samples the stream never holds more than 8 (checked at each sample).
    let mut cfg = StreamConfig::new(3, 0);
    cfg.shuffle_buffer = 8;
    assert_eq!(run(&set, &cfg, None).max_buffered, 8);
    // --max_train_samples caps the epoch.
    cfg.max_samples = Some(10);
    assert_eq!(run(&set, &cfg, None).samples.len(), 10);
}

#[test]
fn shards_are_dealt_to_ranks_round_robin_after_the_shuffle() {
    for n in [2usize, 5, 16] {
        for world in [1usize, 2, 3] {
            if n < world {
                continue;
            }
            let mut all = Vec::new();
            for rank in 0..world {
                let mut cfg = StreamConfig::new(7, 2);
                cfg.rank = rank;
                cfg.world = world;
                let mine = rank_shards(n, &cfg);
                assert!(mine.len() == n / world || mine.len() == n / world + 1);
                all.extend(mine);
            }
            all.sort();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "disjoint, all covered");
        }
    }
    // Different epochs shuffle the shards differently.
    let a = rank_shards(16, &StreamConfig::new(7, 0));
    let b = rank_shards(16, &StreamConfig::new(7, 1));
    assert_ne!(a, b);
    // Two ranks over real shards: disjoint samples, together all of them.
    let d = tmp("ranks");
    let set = set_of(good_shards(&d, 5, 4));
    let mut seen = BTreeSet::new();
    for rank in 0..2 {
        let mut cfg = StreamConfig::new(7, 0);
        cfg.rank = rank;
        cfg.world = 2;
        cfg.shuffle_buffer = 3;
        for s in run(&set, &cfg, None).samples {
            assert!(seen.insert(s.1), "a sample on two ranks");
        }
    }
    assert_eq!(seen.len(), 20);
    let mut cfg = StreamConfig::new(7, 0);
    cfg.world = 6;
    let e = run_stream(&set, &cfg, None, &mut |_, _| Ok(true)).unwrap_err();
    assert!(
        e.to_string()
            .contains("every rank needs at least one shard"),
        "{e}"
    );
}

/// From every position of the stream, a resume point (the latest snapshot
/// at or before it) gives exactly the rest of the uninterrupted stream, for
/// several buffer sizes and snapshot intervals, across a truncated shard,
/// broken samples and long names.
#[test]
fn resume_from_any_position_gives_the_rest_of_the_stream() {
    let d = tmp("resume-stream");
    let (mut shards, _) = awkward_shards(&d);
    shards.extend(good_shards(&d, 3, 5));
    let set = set_of(shards);
    for (buffer, every) in [(1usize, 1usize), (4, 1), (4, 3), (7, 5), (50, 2)] {
        let mut cfg = StreamConfig::new(11, 1);
        cfg.shuffle_buffer = buffer;
        cfg.snapshot_every = every;
        let full = run(&set, &cfg, None);
        let n = full.samples.len() as u64;
        assert!(n > 20);
        let mut snaps = vec![Snapshot::start(&cfg)];
        snaps.extend(full.snapshots.iter().cloned());
        for e in 0..=n {
            let snap = snaps.iter().rev().find(|s| s.emitted <= e).unwrap();
            // Through JSON, as a checkpoint keeps it.
            let point = ResumePoint {
                snapshot: snap.clone(),
                position: e,
            };
            let back = ResumePoint::from_json(&point.to_json()).unwrap();
            assert_eq!(back, point);
            let rest = run(&set, &cfg, Some(&back.snapshot));
            let got: Vec<_> = rest.samples.into_iter().filter(|s| s.0 >= e).collect();
            assert_eq!(
                got[..],
                full.samples[e as usize..],
                "buffer {buffer}, snapshot every {every}: resumed at {e} from {}",
                snap.emitted
            );
        }
    }
    // A shard rewritten since the snapshot: the resume says so.
    let mut cfg = StreamConfig::new(11, 1);
    cfg.shuffle_buffer = 6;
    cfg.snapshot_every = 4;
    let full = run(&set, &cfg, None);
    let snap = full
        .snapshots
        .iter()
        .find(|s| !s.buffer.is_empty())
        .unwrap();
    let victim = &set.shards[snap.buffer[0].shard];
    let saved = std::fs::read(victim).unwrap();
    write_tar(victim, &[("other/0001.png".into(), png(1))]);
    let e = run_stream(&set, &cfg, Some(snap), &mut |_, _| Ok(true)).unwrap_err();
    assert!(
        format!("{e:#}").contains(&victim.display().to_string()),
        "{e:#}"
    );
    std::fs::write(victim, saved).unwrap();
}

#[test]
fn loader_batches_are_the_same_for_any_workers_and_resume_exactly() {
    let d = tmp("loader");
    let (mut shards, _) = awkward_shards(&d);
    shards.extend(good_shards(&d, 4, 6));
    let set = Arc::new(set_of(shards));
    let mut cfg = StreamConfig::new(5, 0);
    cfg.shuffle_buffer = 9;
    cfg.snapshot_every = 4;
    let start = |workers: usize, resume: Option<ResumePoint>| {
        StreamLoader::new(
            set.clone(),
            cfg.clone(),
            resume,
            loader_cfg(5, workers),
            processor(),
            tokenizer(),
            1000,
        )
        .unwrap()
    };
    let mut l = start(1, None);
    let mut full = Vec::new();
    let mut points = vec![l.resume_point(0).unwrap()];
    while let Some(b) = l.next_batch().unwrap() {
        full.push(b);
        points.push(l.resume_point(l.position()).unwrap());
    }
    assert!(full.len() >= 6, "{} batches", full.len());
    assert!(full.iter().all(|b| b.batch == 5) || full.last().unwrap().batch < 5);
    assert!(l.stats().max_buffered <= 9);
    for w in [2, 4] {
        assert_eq!(all(&mut start(w, None)), full, "{w} workers");
    }
    // From after every batch, through JSON: the same following batches.
    for (k, p) in points.iter().enumerate() {
        let p = ResumePoint::from_json(&p.to_json()).unwrap();
        let mut r = start(3, Some(p.clone()));
        assert_eq!(r.position(), p.position);
        let rest = all(&mut r);
        let same = |a: &LoadedBatch, b: &LoadedBatch| {
            a.pixels == b.pixels && a.ids == b.ids && a.batch == b.batch
        };
        assert_eq!(rest.len(), full.len() - k, "resumed after batch {k}");
        for (a, b) in rest.iter().zip(&full[k..]) {
            assert!(same(a, b), "resumed after batch {k}");
        }
    }
}

// ---------------------------------------------------------------------------
// Training from shards.

fn train_args(model: &Path, spec: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--train_file",
        spec,
        "--output_dir",
        out.to_str().unwrap(),
        "--do_train",
        "--per_device_train_batch_size",
        "3",
        "--learning_rate",
        "1e-3",
        "--weight_decay",
        "0.1",
        "--warmup_steps",
        "2",
        "--max_seq_length",
        "16",
        "--logging_steps",
        "1",
        "--no_progress",
        "--shuffle_buffer",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn max_diff(a: &Path, b: &Path) -> f32 {
    let a = Weights::load_dir(a).unwrap();
    let b = Weights::load_dir(b).unwrap();
    let mut worst = 0.0f32;
    for (k, t) in &a.tensors {
        for (x, y) in t.data.iter().zip(&b.tensors[k].data) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// `train --train_file 'shards/{00000..0000N}.tar'`: the run streams the
/// shards, checkpoints record the stream, and a run resumed from a
/// mid-shard checkpoint (the buffer restored and the samples since the
/// snapshot read again) ends with the weights of the uninterrupted run; with
/// full-batch accumulation, whose second pass decodes pictures again from a
/// resume point. `eval` reads validation shards.
#[test]
fn train_from_shards_resumes_mid_shard_to_the_same_weights() {
    if !have_gpu() {
        return;
    }
    let root = temp("wds-train");
    let data = root.join("shards");
    std::fs::create_dir_all(&data).unwrap();
    good_shards(&data, 3, 7);
    let spec = format!("{}/{{00000..00002}}.tar", data.display());
    let model = fixture_model("clip");
    for (name, extra, env) in [
        ("plain", vec!["--max_steps", "8", "--save_steps", "3"], "4"),
        (
            "accum",
            vec![
                "--max_steps",
                "6",
                "--save_steps",
                "2",
                "--gradient_accumulation_steps",
                "2",
            ],
            "5",
        ),
    ] {
        // A run into `out` that must succeed; its stderr.
        let run = |out: &Path| {
            let o = bin()
                .args(train_args(&model, &spec, out, &extra))
                .env("CLIP_WGPU_WDS_SNAPSHOT_EVERY", env)
                .env("CLIP_WGPU_GROUP_HOST_MIB", "0")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(o.status.success(), "{err}");
            err
        };
        let full = root.join(format!("{name}-full"));
        let err = run(&full);
        assert!(err.contains("3 WebDataset shard(s)"), "{err}");
        // The checkpoint records where the stream stood, mid-shard.
        let ck = if name == "plain" {
            "checkpoint-3"
        } else {
            "checkpoint-2"
        };
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(full.join(ck).join("trainer_state.json")).unwrap(),
        )
        .unwrap();
        let ds = &state["clip_wgpu"]["data_stream"];
        let point = ResumePoint::from_json(ds).unwrap();
        assert!(point.position > 0 && point.snapshot.offset > 0, "{ds}");
        assert!(!point.snapshot.buffer.is_empty(), "{ds}");
        // Samples since the snapshot are read again on resume.
        assert!(point.snapshot.emitted < point.position, "{ds}");
        // A fresh folder holding only that checkpoint: the same command
        // resumes from it.
        let resumed = root.join(format!("{name}-resumed"));
        common::copy_dir(&full.join(ck), &resumed.join(ck));
        let err = run(&resumed);
        assert!(err.contains("resumed from"), "{err}");
        let worst = max_diff(&full, &resumed);
        eprintln!("{name}: resumed vs uninterrupted, max abs difference {worst:e}");
        assert!(worst <= 1e-6, "{name}: resumed run differs by {worst}");
        // Another shuffle buffer: refused, naming both.
        let mut other = train_args(&model, &spec, &resumed, &extra);
        other.extend([
            "--shuffle_buffer".into(),
            "6".into(),
            "--max_steps".into(),
            "12".into(),
        ]);
        let o = bin().args(&other).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("shuffle buffer"),
            "{err}"
        );
    }
    // Evaluation from shards: `eval --validation_file` reads them in order.
    let o = bin()
        .args([
            "eval",
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--validation_file",
            &spec,
            "--output_dir",
            root.join("eval").to_str().unwrap(),
            "--per_device_eval_batch_size",
            "4",
            "--max_seq_length",
            "16",
            "--no_progress",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("eval/eval_results.json")).unwrap())
            .unwrap();
    assert!(r["eval_loss"].as_f64().unwrap().is_finite(), "{r}");
    assert!(err.contains("21 examples from 3 shard(s)"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

// ---------------------------------------------------------------------------
// Measurements (not run by default):
//   scripts/wds_shards.py /usr/share/tuxpaint/stamps /tmp/s100 --shards 100 --repeat 10
//   scripts/wds_shards.py /usr/share/tuxpaint/stamps /tmp/s8 --shards 8
//   WDS_BENCH_SHARDS='/tmp/s100/{00000..00099}.tar' WDS_BENCH_SAME='/tmp/s8/{00000..00007}.tar' \
//   WDS_BENCH_FOLDER=/usr/share/tuxpaint/stamps \
//     cargo test --release --test webdataset -- --ignored --nocapture measure

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The loader alone (decoding and preprocessing for the demo model's 64 x 64
/// input, batches of 16): images/s from a folder of pictures and from
/// shards of the same pictures, and the resident memory while streaming 100
/// shards through a shuffle buffer of 1000.
#[test]
#[ignore]
fn measure_stream_throughput_and_memory() {
    use clip_wgpu::data::loader::epoch_order;
    use clip_wgpu::data::sources::sidecar_folder;
    let env = |k: &str| std::env::var(k).ok();
    let workers: usize = env("WDS_BENCH_WORKERS").map_or(2, |w| w.parse().unwrap());
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    let proc_ = ImageProcessorConfig::from_model_dir(&demo).unwrap();
    let lc = |b| LoaderConfig {
        batch_size: b,
        max_len: 32,
        workers,
        prefetch: 4,
        drop_last: false,
        refill: true,
    };
    let stream = |spec: &str, buffer: usize, rss: bool| {
        let set = Arc::new(ShardSet::open(Path::new(spec), CaptionRule::TxtThenJson).unwrap());
        let mut cfg = StreamConfig::new(42, 0);
        cfg.shuffle_buffer = buffer;
        let t0 = std::time::Instant::now();
        let mut l = StreamLoader::new(
            set.clone(),
            cfg,
            None,
            lc(16),
            proc_.clone(),
            tokenizer(),
            64,
        )
        .unwrap();
        let (mut n, mut k) = (0usize, 0usize);
        let mut samples = Vec::new();
        while let Some(b) = l.next_batch().unwrap() {
            n += b.batch;
            k += 1;
            if rss && k % 25 == 0 {
                samples.push((n, l.stats().read, rss_mib()));
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        (set.shards.len(), n, dt, samples, l.stats())
    };
    if let Some(folder) = env("WDS_BENCH_FOLDER") {
        let d = sidecar_folder(Path::new(&folder)).unwrap();
        let ex = Arc::new(d.examples);
        // As many epochs as the 100 shards repeat the pictures.
        let epochs: u64 = env("WDS_BENCH_EPOCHS").map_or(10, |e| e.parse().unwrap());
        let t0 = std::time::Instant::now();
        let mut n = 0;
        for epoch in 0..epochs {
            let mut l = Loader::new(
                ex.clone(),
                epoch_order(ex.len(), 42, epoch),
                0,
                lc(16),
                proc_.clone(),
                tokenizer(),
            )
            .unwrap();
            while let Some(b) = l.next_batch().unwrap() {
                n += b.batch;
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        eprintln!(
            "folder {folder}: {n} pictures ({epochs} epochs) in {dt:.2} s: {:.0} images/s ({workers} workers)",
            n as f64 / dt
        );
    }
    if let Some(spec) = env("WDS_BENCH_SAME") {
        let (s, n, dt, _, st) = stream(&spec, 1000, false);
        eprintln!(
            "shards {spec}: {s} shards, {n} samples in {dt:.2} s: {:.0} images/s ({workers} workers), {st:?}",
            n as f64 / dt
        );
    }
    if let Some(spec) = env("WDS_BENCH_SHARDS") {
        let before = rss_mib();
        let (s, n, dt, samples, st) = stream(&spec, 1000, true);
        eprintln!(
            "shards {spec}: {s} shards, {n} samples in {dt:.2} s: {:.0} images/s, {st:?}; RSS before {before:.1} MiB",
            n as f64 / dt
        );
        for (n, read, r) in &samples {
            eprintln!("  after {n:5} samples used ({read:5} read): RSS {r:.1} MiB");
        }
    }
}
