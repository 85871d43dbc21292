//! `embed --images DIR` / `--texts FILE` and `search`:
//! - a folder embedded by a run killed part-way (at a checkpoint, and with
//!   rows written after the last checkpoint) and then rerun gives the same
//!   file, byte for byte, as an uninterrupted run; the same for texts;
//! - the file's rows are the pictures' own embeddings, its metadata lists
//!   them (and the unreadable one), and the safetensors crate reads it;
//! - search results equal a CPU ranking (f64 dot products) of the index.
#![cfg(unix)]
mod common;
use clip_wgpu::embed::Embedder;
use clip_wgpu::index::{list_images, Index};
use clip_wgpu::ops::topk::rank_ref;
use common::cli::{bin, have_gpu, spawn, stderr, temp, write_image};
use common::{fixture_model, gpu};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn ok(o: Output, what: &str) -> Output {
    assert!(o.status.success(), "{what} failed:\n{}", stderr(&o));
    o
}

/// Wait until `file` (a child's stderr) holds `needle`; false if the child
/// ended first.
fn wait_for_line(child: &mut Child, file: &Path, needle: &str) -> bool {
    let t0 = Instant::now();
    loop {
        if std::fs::read_to_string(file)
            .unwrap_or_default()
            .contains(needle)
        {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return std::fs::read_to_string(file)
                .unwrap_or_default()
                .contains(needle);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "waited too long for {needle:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// 19 pictures in nested folders, one unreadable `.png`, and files that
/// are not pictures.
fn picture_folder(root: &Path) -> PathBuf {
    let d = root.join("pictures");
    for (i, sub) in ["", "animals", "animals/cats", "food", "z"]
        .iter()
        .cycle()
        .take(19)
        .enumerate()
    {
        std::fs::create_dir_all(d.join(sub)).unwrap();
        write_image(&d.join(sub).join(format!("p{i:02}.png")), i);
    }
    std::fs::write(d.join("food/broken.png"), b"not a picture").unwrap();
    std::fs::write(d.join("food/notes.txt"), b"a caption").unwrap();
    std::fs::write(d.join("animals/sound.ogg"), b"OggS").unwrap();
    d
}

fn embed_cmd(model: &Path, what: &str, input: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.args(["embed", "--model"])
        .arg(model)
        .arg(what)
        .arg(input)
        .arg("--output")
        .arg(out)
        .args(["--batch", "3", "--checkpoint-every", "2", "--workers", "2"]);
    c
}

/// Kill the run once it has written batch `hold` (logged by the test hook),
/// check what it left, rerun it and return the stderr of the rerun.
fn killed_then_rerun(
    model: &Path,
    what: &str,
    input: &Path,
    out: &Path,
    hold: usize,
    root: &Path,
) -> String {
    let err = root.join(format!("killed-{hold}.err"));
    let mut c = embed_cmd(model, what, input, out);
    c.env("CLIP_WGPU_TEST_EMBED_HOLD", hold.to_string());
    let mut child = spawn(&mut c, &err);
    let line = format!("test hold: batch {hold} written");
    assert!(
        wait_for_line(&mut child, &err, &line),
        "the run ended before batch {hold}:\n{}",
        std::fs::read_to_string(&err).unwrap()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let name = out.file_name().unwrap().to_str().unwrap();
    assert!(!out.exists(), "a killed run wrote {name}");
    assert!(out.with_file_name(format!("{name}.partial.json")).exists());
    assert!(out.with_file_name(format!("{name}.partial")).exists());
    let o = ok(
        embed_cmd(model, what, input, out).output().unwrap(),
        "rerun",
    );
    assert!(!out.with_file_name(format!("{name}.partial")).exists());
    assert!(!out.with_file_name(format!("{name}.partial.json")).exists());
    stderr(&o)
}

#[test]
fn embedding_a_folder_after_a_kill_gives_the_same_file() {
    if !have_gpu() {
        return;
    }
    let root = temp("index-images");
    let pictures = picture_folder(&root);
    let model = fixture_model("clip");
    let full = root.join("full.safetensors");
    ok(
        embed_cmd(&model, "--images", &pictures, &full)
            .output()
            .unwrap(),
        "embed",
    );
    let want = std::fs::read(&full).unwrap();
    // 20 pictures in batches of 3, a checkpoint every 2 batches: killed
    // right after the checkpoint of batch 4, and after batch 5 whose rows
    // are past the last checkpoint (the rerun drops them).
    for hold in [4, 5] {
        let out = root.join(format!("killed-{hold}.safetensors"));
        let log = killed_then_rerun(&model, "--images", &pictures, &out, hold, &root);
        assert!(log.contains("resuming from"), "{log}");
        assert!(
            std::fs::read(&out).unwrap() == want,
            "killed at batch {hold} and rerun: not the uninterrupted run's file"
        );
    }

    // What the file holds: a safetensors file with `embeddings` and the
    // file list, the rows those pictures' embeddings.
    let st = safetensors::SafeTensors::deserialize(&want).unwrap();
    assert_eq!(st.names(), vec!["embeddings"]);
    let index = Index::load(&full).unwrap();
    let mut listed: Vec<String> = list_images(&pictures)
        .unwrap()
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    listed.retain(|p| p != "food/broken.png");
    assert_eq!(index.names, listed);
    assert_eq!(index.kind, "image");
    assert_eq!(index.len(), 19);
    assert!(
        index.metadata["skipped"].contains("food/broken.png"),
        "{:?}",
        index.metadata
    );
    assert_eq!(
        index.model.as_deref(),
        Some(std::fs::canonicalize(&model).unwrap().as_path())
    );
    let Some(gpu) = gpu() else { return };
    let m = Embedder::load(&gpu, &model).unwrap();
    let paths: Vec<PathBuf> = index.names.iter().map(|n| pictures.join(n)).collect();
    let each = m.embed_image_files(&paths).unwrap();
    let e = each
        .iter()
        .zip(&index.embeddings)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        e < 1e-5,
        "the rows differ from the pictures' embeddings by {e:.2e}"
    );
}

#[test]
fn embedding_texts_after_a_kill_gives_the_same_file() {
    if !have_gpu() {
        return;
    }
    let root = temp("index-texts");
    let texts = root.join("texts.txt");
    let lines: Vec<String> = (0..14)
        .map(|i| format!("a {} picture number {i}", common::cli::COLOURS[i % 6]))
        .collect();
    std::fs::write(&texts, lines.join("\n") + "\n").unwrap();
    let model = fixture_model("clip");
    let full = root.join("full.safetensors");
    ok(
        embed_cmd(&model, "--texts", &texts, &full)
            .output()
            .unwrap(),
        "embed",
    );
    let out = root.join("killed.safetensors");
    let log = killed_then_rerun(&model, "--texts", &texts, &out, 3, &root);
    assert!(log.contains("resuming from"), "{log}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&full).unwrap());
    let index = Index::load(&full).unwrap();
    assert_eq!(index.kind, "text");
    assert_eq!(index.names, lines);
}

/// `search`'s results (JSON) against a CPU ranking of the index by f64
/// dot products with the query embedded in-process: the same rows in the
/// same order, where two similarities are not within rounding of each
/// other, and the same similarities.
fn check_search(index_file: &Path, query: &[&str], top: usize, q: &[f32]) {
    let o = ok(
        bin()
            .args(["search", "--index"])
            .arg(index_file)
            .args(query)
            .args(["--top", &top.to_string(), "--json"])
            .output()
            .unwrap(),
        "search",
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<(usize, f64)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["row"].as_u64().unwrap() as usize,
                r["score"].as_f64().unwrap(),
            )
        })
        .collect();
    let index = Index::load(index_file).unwrap();
    let want = rank_ref(q, &index.embeddings, index.dim, top);
    assert_eq!(got.len(), want.k.min(index.len()), "{query:?}");
    let exact = |row: usize| -> f64 {
        index.embeddings[row * index.dim..(row + 1) * index.dim]
            .iter()
            .zip(q)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    for (i, &(row, score)) in got.iter().enumerate() {
        let w = want.indices[i] as usize;
        // A different row only where the CPU scores tie within rounding.
        assert!(
            row == w || (exact(row) - exact(w)).abs() < 1e-6,
            "{query:?}: result {i} is row {row}, the CPU ranks row {w} there"
        );
        assert!(
            (score - exact(row)).abs() < 1e-5,
            "{query:?}: row {row}: {score} vs {}",
            exact(row)
        );
    }
    let mut rows: Vec<usize> = got.iter().map(|g| g.0).collect();
    rows.sort();
    rows.dedup();
    assert_eq!(rows.len(), got.len(), "{query:?}: a row twice");
}

#[test]
fn search_results_equal_a_cpu_ranking() {
    if !have_gpu() {
        return;
    }
    let Some(gpu) = gpu() else { return };
    let root = temp("index-search");
    let pictures = picture_folder(&root);
    let model = fixture_model("clip");
    let images = root.join("images.safetensors");
    ok(
        embed_cmd(&model, "--images", &pictures, &images)
            .output()
            .unwrap(),
        "embed",
    );
    let texts = root.join("texts.txt");
    std::fs::write(
        &texts,
        "a red picture\na green picture\na blue picture\na cat\na dog\n",
    )
    .unwrap();
    let text_index = root.join("texts.safetensors");
    ok(
        embed_cmd(&model, "--texts", &texts, &text_index)
            .output()
            .unwrap(),
        "embed texts",
    );

    let m = Embedder::load(&gpu, &model).unwrap();
    let q = m.embed_texts(&["a red picture"]).unwrap();
    check_search(&images, &["--text", "a red picture"], 5, &q);
    check_search(&images, &["--text", "a red picture"], 100, &q);
    let pic = pictures.join("animals/p01.png");
    let q = m.embed_image_files(std::slice::from_ref(&pic)).unwrap();
    check_search(&images, &["--image", pic.to_str().unwrap()], 3, &q);
    check_search(&text_index, &["--image", pic.to_str().unwrap()], 2, &q);

    // Plain output: rank, similarity, the picture's path.
    let o = ok(
        bin()
            .args(["search", "--index"])
            .arg(&images)
            .args(["--image", pic.to_str().unwrap(), "--top", "1"])
            .output()
            .unwrap(),
        "search",
    );
    let line = String::from_utf8(o.stdout).unwrap();
    let cols: Vec<&str> = line.trim().split('\t').collect();
    assert_eq!(cols[0], "1");
    assert!(
        (cols[1].parse::<f64>().unwrap() - 1.0).abs() < 1e-4,
        "{line}"
    );
    assert_eq!(
        Path::new(cols[2]),
        std::fs::canonicalize(&pic).unwrap(),
        "a picture's best match is itself"
    );
}
