//! `layerwise generate`: text from the original head, an early exit, or an ACD contrast, streamed
//! to stdout as tokens arrive.

use std::io::Write;

use anyhow::{Context, Result};
use layerwise::generation::generate;
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{Backend, LoadedModel};
use serde_json::json;

use crate::input::{GenerationArgs, InputArgs, MaskArgs, PlanArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    plan: PlanArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    #[command(flatten)]
    mask: MaskArgs,
    /// Print one JSON line at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    crate::with_backend!(args.input.model, loaded => run_on(&args, loaded))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>) -> Result<()> {
    let prompt = args.input.prompt.ids(&loaded)?;
    let plan = args.plan.plan()?.unwrap_or_default();
    let options = args.generation.options(&loaded)?;
    // Room for the prompt and every new token of every beam.
    let cache_tokens = Some(options.cache_tokens(prompt.len()));
    let head_mask = args.mask.mask(loaded.model.spec())?;
    let mut decoder =
        Decoder::new(&loaded.model, DecoderOptions { plan, cache_tokens, head_mask, ..Default::default() })
            .context(args.plan.flag())?;

    let mut streamer = Streamer::default();
    let stream = !args.json && loaded.tokenizer.is_some();
    let generation = generate(&mut decoder, &prompt, &options, loaded.tokenizer.as_ref(), |token| {
        if stream {
            streamer.push(&loaded, token);
        }
        true
    })
    .map_err(|e| anyhow::anyhow!(crate::flags::translate(&e.to_string())))
    .context("generate")?;
    let text = match &loaded.tokenizer {
        Some(tokenizer) => tokenizer.decode(&generation.ids)?,
        None => String::new(),
    };
    let new_tokens = generation.ids.len();
    let decode_steps = new_tokens.saturating_sub(1);
    let decode_tok_per_s = if generation.decode_s > 0.0 { decode_steps as f64 / generation.decode_s } else { 0.0 };
    if args.json {
        let mut line = json!({
            "ids": generation.ids,
            "text": text,
            "prompt_tokens": generation.prompt_tokens,
            "new_tokens": new_tokens,
            "prefill_s": generation.prefill_s,
            "decode_s": generation.decode_s,
            "decode_tok_per_s": decode_tok_per_s,
        });
        if generation.sequences.len() > 1 {
            line["sequences"] = json!(generation.sequences);
        }
        println!("{line}");
    } else {
        if !stream {
            // No tokenizer: print the ids.
            let ids: Vec<String> = generation.ids.iter().map(u32::to_string).collect();
            print!("{}", ids.join(","));
        }
        println!();
        eprintln!(
            "generate: {} prompt tokens, {new_tokens} new ({:?}); prefill {:.3}s, decode {decode_tok_per_s:.1} tokens/s; {}",
            generation.prompt_tokens,
            generation.finish,
            generation.prefill_s,
            crate::memory::describe()
        );
    }
    Ok(())
}

/// Prints text as tokens arrive, holding back an incomplete UTF-8 character until it is complete.
#[derive(Default)]
struct Streamer {
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer {
    fn push<B: Backend>(&mut self, loaded: &LoadedModel<B>, token: u32) {
        self.ids.push(token);
        let Ok(text) = loaded.decode(&self.ids) else { return };
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (e.g. `| head`) is not worth a panic; the final result still follows.
        let _ = stdout.write_all(&text.as_bytes()[self.printed..]);
        let _ = stdout.flush();
        self.printed = text.len();
    }
}
