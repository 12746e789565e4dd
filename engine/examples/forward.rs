//! Read a prompt at the original head and at an early exit.
//!
//! `cargo run --release --example forward -p layerwise [MODEL_DIR_OR_HUB_ID]`

use layerwise::{load, ForwardRequest};

fn main() -> layerwise::Result<()> {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");
    let source = std::env::args().nth(1).unwrap_or_else(|| demo.to_string());
    let loaded = load(&source)?;
    let spec = loaded.model.spec();
    let ids = loaded.encode("The benefits of bad advice")?;
    let Some(&exit) = spec.exit_layers.first() else {
        println!("{source} has no exit heads");
        return Ok(());
    };
    let request = ForwardRequest { logits: true, exits: vec![exit], ..Default::default() };
    let out = loaded.model.forward(&ids, &request)?;
    let vocab = spec.vocab_size;
    let last = |logits: &[f32]| argmax(&logits[(ids.len() - 1) * vocab..]) as u32;
    let top = last(out.logits.as_deref().unwrap_or_default());
    let early = last(&out.exits[&exit]);
    println!("original head predicts {:?}", loaded.decode(&[top])?);
    println!("exit {exit} predicts {:?}", loaded.decode(&[early])?);
    Ok(())
}

fn argmax(values: &[f32]) -> usize {
    (0..values.len()).max_by(|&a, &b| values[a].total_cmp(&values[b])).unwrap_or(0)
}
