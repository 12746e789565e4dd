//! `layerwise generate`: text from the original head, an early exit, or an ACD contrast, streamed
//! to stdout as tokens arrive.

use anyhow::{Context, Result};
use layerwise::generation::generate;
use layerwise::generation::speculative::{generate_speculative, SpeculationStats};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{Backend, LoadedModel};
use serde_json::json;

use crate::input::{GenerationArgs, InputArgs, MaskArgs, PlanArgs, SpeculateArgs};

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
    #[command(flatten)]
    speculation: SpeculateArgs,
}

pub fn run(args: Args) -> Result<()> {
    crate::with_backend!(args.input.model, loaded => run_on(&args, loaded))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>) -> Result<()> {
    let prompt = args.input.prompt.ids(&loaded)?;
    let plan = args.plan.plan()?.unwrap_or_default();
    let options = args.generation.options(&loaded)?;
    // Before the cache is sized by them.
    options
        .check(prompt.len(), loaded.model.spec())
        .map_err(|e| anyhow::anyhow!(crate::flags::translate(&e.to_string())))?;
    // Room for the prompt and every new token of every beam.
    let cache_tokens = Some(options.cache_tokens(prompt.len() + loaded.model.spec().virtual_tokens));
    let head_mask = args.mask.mask(loaded.model.spec())?;
    let mut decoder =
        Decoder::new(&loaded.model, DecoderOptions { plan, cache_tokens, head_mask, ..Default::default() }).map_err(
            |e| crate::flags::decoder_error(e, "--max-new-tokens with --num-beams or --top-k", args.plan.flag()),
        )?;

    let mut streamer = Streamer::default();
    let stream = !args.json && loaded.tokenizer.is_some();
    // A failed write (the reader of a pipe gone, a full disk) stops generating: nobody reads on.
    let mut write_error = None;
    let mut on_token = |token| {
        if stream {
            if let Err(e) = streamer.push(&loaded, token) {
                write_error = Some(e);
                return false;
            }
        }
        true
    };
    let tokenizer = loaded.tokenizer.as_ref();
    let (generation, speculated) = match args.speculation.options()? {
        None => (generate(&mut decoder, &prompt, &options, tokenizer, &mut on_token), None),
        Some(s) => match generate_speculative(&mut decoder, &prompt, &options, &s, tokenizer, &mut on_token) {
            Ok((generation, stats)) => (Ok(generation), Some(stats)),
            Err(e) => (Err(e), None),
        },
    };
    let generation = generation
        .map_err(|e| anyhow::anyhow!(crate::flags::translate(&e.to_string())))
        .context(if args.speculation.speculate.is_some() { "generate --speculate" } else { "generate" })?;
    if let Some(e) = write_error {
        return Err(anyhow::Error::new(e).context("writing to stdout"));
    }
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
        if let Some(adapter) = &loaded.adapter {
            line["adapter"] = json!(adapter);
        }
        if let Some(stats) = &speculated {
            line["speculation"] = speculation_json(stats);
        }
        crate::output::line(&line)?;
    } else {
        if stream {
            crate::output::line("")?;
        } else {
            // No tokenizer: print the ids.
            let ids: Vec<String> = generation.ids.iter().map(u32::to_string).collect();
            crate::output::line(ids.join(","))?;
        }
        eprintln!(
            "generate: {} prompt tokens, {new_tokens} new ({:?}); prefill {:.3}s, decode {decode_tok_per_s:.1} tokens/s; {}",
            generation.prompt_tokens,
            generation.finish,
            generation.prefill_s,
            crate::memory::describe()
        );
        if let Some(s) = &speculated {
            eprintln!(
                "speculation: drafts from exit {}: {} rounds, {} of {} drafts accepted ({:.0}%), {:.2} tokens a round, {} plain steps",
                s.draft_layer,
                s.rounds,
                s.accepted,
                s.drafted,
                100.0 * s.acceptance_rate(),
                s.tokens_per_round(),
                s.plain_steps
            );
            if s.layers.len() > 1 {
                let per_exit: Vec<String> = s
                    .layers
                    .iter()
                    .map(|l| {
                        format!(
                            "exit {}: {} of {} ({:.0}%)",
                            l.layer,
                            l.accepted,
                            l.drafted,
                            100.0 * l.acceptance_rate()
                        )
                    })
                    .collect();
                eprintln!("speculation per draft exit: {}", per_exit.join(", "));
            }
        }
    }
    Ok(())
}

/// What speculation did, as JSON (`generate --json`, `bench`).
pub fn speculation_json(s: &SpeculationStats) -> serde_json::Value {
    json!({
        "draft_layer": s.draft_layer,
        "rounds": s.rounds,
        "plain_steps": s.plain_steps,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "acceptance_rate": s.acceptance_rate(),
        "tokens_per_round": s.tokens_per_round(),
        "layers": s.layers.iter().map(|l| json!({
            "layer": l.layer,
            "rounds": l.rounds,
            "drafted": l.drafted,
            "accepted": l.accepted,
            "acceptance_rate": l.acceptance_rate(),
        })).collect::<Vec<_>>(),
    })
}

/// Prints text as tokens arrive, holding back an incomplete UTF-8 character until it is complete.
#[derive(Default)]
struct Streamer {
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer {
    fn push<B: Backend>(&mut self, loaded: &LoadedModel<B>, token: u32) -> std::io::Result<()> {
        self.ids.push(token);
        let Ok(text) = loaded.decode(&self.ids) else { return Ok(()) };
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return Ok(());
        }
        crate::output::stream(&text.as_bytes()[self.printed..])?;
        self.printed = text.len();
        Ok(())
    }
}
