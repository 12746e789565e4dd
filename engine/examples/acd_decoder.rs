//! Auto-contrastive decoding written directly against the step-by-step decoder API: two sequences
//! (the same prompt under greedy ACD, and a fork of it that takes the runner-up token once), stepped
//! together in one batch over the paged KV cache.
//!
//! `cargo run --release --example acd_decoder -p layerwise [MODEL_DIR_OR_HUB_ID] [UPPER LOWER]`

use layerwise::exits::{ExitPlan, PlanOptions, Upper};
use layerwise::math::argmax;
use layerwise::runtime::{Decoder, DecoderOptions};

fn main() -> layerwise::Result<()> {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let source = args.first().map_or(demo, String::as_str);
    let loaded = layerwise::load(source)?;
    let spec = loaded.model.spec();
    // Default: the top layer against the lowest exit head.
    let upper = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(spec.num_layers);
    let lower = args.get(2).and_then(|s| s.parse().ok()).or(spec.exit_layers.first().copied()).unwrap_or(1);
    let plan = PlanOptions { plan: ExitPlan::Contrast { upper: Upper::Layer(upper), lower }, ..Default::default() };
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions { plan, ..Default::default() })?;

    let prompt = loaded.encode("The benefits of bad advice")?;
    let greedy = decoder.add_sequence(&prompt)?;
    let scores = decoder.step()?.remove(0).logits; // prefill
    let first = argmax(&scores);
    // The runner-up: the best score once the winner is masked out.
    let mut masked = scores.clone();
    masked[first as usize] = f32::NEG_INFINITY;
    let detour = decoder.fork(greedy)?; // shares the prompt's cache blocks
    decoder.append(greedy, first)?;
    decoder.append(detour, argmax(&masked))?;

    for _ in 0..12 {
        for output in decoder.step()? {
            decoder.append(output.seq, argmax(&output.logits))?;
        }
    }
    for (name, seq) in [("greedy", greedy), ("detour", detour)] {
        let tokens = decoder.tokens(seq)?;
        println!("{name}: {:?}", loaded.decode(&tokens[prompt.len()..])?);
    }
    println!("ACD {upper} vs {lower}: each step ran {} of {} blocks", decoder.depth(), spec.num_layers);
    Ok(())
}
