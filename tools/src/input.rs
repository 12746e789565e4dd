//! Arguments shared by the subcommands: which model, which prompt.

use anyhow::{bail, Context, Result};
use layerwise::{Cpu, LoadedModel};

/// The demo checkpoint shipped in the repository (random weights, real GPT-2 vocabulary).
pub const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// A local checkpoint directory or a Hugging Face Hub id (e.g. ibm/gpt2-medium-multiexit).
    /// Defaults to the repository's demo checkpoint (random weights).
    #[arg(long, value_name = "SRC")]
    pub model: Option<String>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel<Cpu>> {
        let source = self.model.as_deref().unwrap_or(DEMO_MODEL);
        layerwise::load(source).with_context(|| format!("cannot load model `{source}`"))
    }
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Prompt text, tokenized with the checkpoint's tokenizer.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (e.g. 464,3483,286).
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Option<String>,
}

impl PromptArgs {
    /// The prompt's token ids, checked against the model's vocabulary and context.
    pub fn ids(&self, loaded: &LoadedModel<Cpu>) -> Result<Vec<u32>> {
        let ids = match (&self.prompt, &self.prompt_ids) {
            (Some(text), _) => loaded.encode(text).context("--prompt")?,
            (None, Some(list)) => parse_ids(list)?,
            (None, None) => bail!("give --prompt or --prompt-ids"),
        };
        loaded.model.check_prompt(&ids).context(if self.prompt.is_some() { "--prompt" } else { "--prompt-ids" })?;
        Ok(ids)
    }
}

fn parse_ids(list: &str) -> Result<Vec<u32>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().with_context(|| {
                format!("--prompt-ids: `{s}` is not a token id (expected comma-separated non-negative integers)")
            })
        })
        .collect()
}
