//! Load a Hugging Face checkpoint (BERT family) and embed sentences.
//!
//!     cargo run --release -p formers --example embed [-- DIR]
//!
//! DIR holds `config.json`, `model.safetensors` and `tokenizer.json` (e.g. a
//! sentence-transformers model such as all-MiniLM-L6-v2); it defaults to the tiny
//! random-weight BERT under `tests/fixtures/tiny-bert`, so nothing is downloaded.

use std::path::{Path, PathBuf};

use formers::{embed, pretrained};

fn main() -> formers::Result<()> {
    let dir = std::env::args_os().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert"),
        PathBuf::from,
    );
    let loaded = pretrained::load(&dir)?;
    if let Some(w) = loaded.unused_warning() {
        eprintln!("{w}");
    }
    let sentences = [
        "To be, or not to be, that is the question.",
        "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune",
    ];
    let max_len = loaded.config.max_len;
    let ids = sentences
        .iter()
        .map(|s| {
            let mut ids = embed::tokenize(&loaded.tokenizer, s)?;
            embed::truncate(&mut ids, max_len);
            Ok(ids)
        })
        .collect::<formers::Result<Vec<_>>>()?;
    // One padding-free batch; one row per sentence (normalised when the model says so).
    let rows = embed::embed_batch(&loaded.model, &ids)?;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    println!(
        "{}: {} model, {} sentences -> {}-dimensional embeddings",
        dir.display(),
        loaded.family.name(),
        rows.len(),
        rows[0].len()
    );
    for (i, s) in sentences.iter().enumerate() {
        println!(
            "{s:?}: cosine to the first {:.4}",
            dot(&rows[0], &rows[i]) / (dot(&rows[0], &rows[0]) * dot(&rows[i], &rows[i])).sqrt()
        );
    }
    Ok(())
}
