//! Continuous batching: many generation requests over one decoder's paged cache, every step one
//! batched forward of all running sequences.
//!
//! A request waits in a queue until its sequences fit (slots: [`SchedulerOptions::max_sequences`],
//! beams and contrastive-search candidates counting one each; cache blocks for its prompt); a
//! finished request's slots are refilled at once. Prompts run in chunks of at most
//! [`SchedulerOptions::max_step_tokens`] tokens per step beside the decoding sequences, so a long
//! prompt never stalls the others. When the cache cannot hold a step, the newest requests are
//! preempted: their blocks go back to the pool, their tokens stay, and they are recomputed when
//! they are admitted again (before any request that never started); nothing is lost. Every
//! request's strategy is its own [`Job`]: the scheduler only runs steps and hands each job the
//! outputs of its sequences, so what a request generates does not depend on what runs beside it
//! (up to the last bits of batched arithmetic).
//!
//! ```
//! use layerwise::generation::{Event, GenerationOptions, Request, Scheduler, SchedulerOptions};
//! use layerwise::runtime::{Decoder, DecoderOptions};
//!
//! # fn main() -> layerwise::Result<()> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let loaded = layerwise::load(dir)?;
//! let decoder = Decoder::new(&loaded.model, DecoderOptions { cache_tokens: Some(256), ..Default::default() })?;
//! let mut scheduler = Scheduler::new(decoder, None, SchedulerOptions::default());
//! let options = GenerationOptions { max_new_tokens: 4, ..Default::default() };
//! for prompt in [vec![5, 17, 42], vec![7; 20], vec![1, 2]] {
//!     scheduler.submit(Request { prompt, options: options.clone() })?;
//! }
//! let mut finished = 0;
//! while !scheduler.is_idle() {
//!     for event in scheduler.step()? {
//!         if let Event::Finished { result, .. } = event {
//!             assert_eq!(result?.generation.ids.len(), 4);
//!             finished += 1;
//!         }
//!     }
//! }
//! assert_eq!(finished, 3);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::options::GenerationOptions;
use super::strategy::{Decode, FinishReason, Job, JobOutputs, Run, SeqOutput};
use super::Generation;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::runtime::{Decoder, SeqId};

/// How a [`Scheduler`] batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Sequences one step runs at most (a beam or a contrastive-search candidate is one each).
    pub max_sequences: usize,
    /// Prompt tokens one step runs at most besides the decoding sequences' tokens (chunked prefill).
    pub max_step_tokens: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions { max_sequences: 16, max_step_tokens: 512 }
    }
}

/// What to generate: a prompt and the options of one generation (its strategy among them).
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub options: GenerationOptions,
}

/// Handle of a submitted request (in order of submission).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A finished request.
#[derive(Clone, Debug)]
pub struct Completion {
    /// What was generated; `prefill_s` counts from admission to the first outputs.
    pub generation: Generation,
    /// Seconds from submission to admission.
    pub queued_s: f64,
    /// Times the request was preempted (and recomputed).
    pub preemptions: usize,
}

/// What a [`Scheduler::step`] reports, per request.
#[derive(Debug)]
pub enum Event {
    /// New ids of the request's streamed sequence, in order.
    Tokens { request: RequestId, ids: Vec<u32> },
    /// The request ended; an error fails this request only.
    Finished { request: RequestId, result: Result<Completion> },
}

/// Counts over the scheduler's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub steps: u64,
    /// Rows run, summed over steps (prompt and generated tokens, recomputation included).
    pub rows: u64,
    pub preemptions: u64,
    /// The most sequences one step ran.
    pub peak_sequences: usize,
}

/// A request admitted (or preempted, waiting to be admitted again).
struct Active<'t, B: Backend> {
    id: RequestId,
    job: Box<dyn Job<B> + 't>,
    outputs: JobOutputs,
    prompt_tokens: usize,
    submitted: Instant,
    admitted: Option<Instant>,
    first_output: Option<f64>,
    preemptions: usize,
}

/// Continuous batching over a decoder. See the module documentation.
pub struct Scheduler<'m, 't, B: Backend> {
    decoder: Decoder<'m, B>,
    tokenizer: Option<&'t Tokenizer>,
    options: SchedulerOptions,
    /// Requests never started, in order of submission.
    queue: VecDeque<Active<'t, B>>,
    /// Requests preempted, oldest first: admitted before the queue.
    preempted: Vec<Active<'t, B>>,
    /// Requests running, oldest first.
    running: Vec<Active<'t, B>>,
    next_id: u64,
    stats: SchedulerStats,
}

impl<'m, 't, B: Backend> Scheduler<'m, 't, B> {
    /// A scheduler over `decoder` (its plan, cache and head mask serve every request);
    /// `tokenizer` is needed only by requests with text stopping rules.
    pub fn new(decoder: Decoder<'m, B>, tokenizer: Option<&'t Tokenizer>, options: SchedulerOptions) -> Self {
        Scheduler {
            decoder,
            tokenizer,
            options: SchedulerOptions { max_sequences: options.max_sequences.max(1), ..options },
            queue: VecDeque::new(),
            preempted: Vec::new(),
            running: Vec::new(),
            next_id: 0,
            stats: SchedulerStats::default(),
        }
    }

    /// Queues a request. Its options are checked now (against the model, the batch width and the
    /// cache: a request that could never fit is refused here, naming what is too large).
    pub fn submit(&mut self, request: Request) -> Result<RequestId> {
        let Request { prompt, options } = request;
        let spec = self.decoder.model().spec();
        options.check(prompt.len(), spec)?;
        self.decoder.model().check_prompt(&prompt)?;
        let run = Run::new(options.clone(), self.tokenizer)?;
        let job = options.strategy.job(&prompt, run, &self.decoder)?;
        if job.width() > self.options.max_sequences {
            return Err(Error::invalid(
                "max_sequences",
                format!(
                    "the request runs {} sequences side by side, more than the {} a step runs",
                    job.width(),
                    self.options.max_sequences
                ),
            ));
        }
        let pool = self.decoder.pool();
        let block_size = pool.block_size();
        // Worst case: every sequence of the request holds its own blocks.
        let tokens = prompt.len() + spec.virtual_tokens + options.max_new_tokens;
        let worst = job.width() * tokens.div_ceil(block_size) + job.width();
        if worst > pool.num_blocks() {
            return Err(Error::invalid(
                "cache_tokens",
                format!(
                    "the request may need {worst} cache blocks of {block_size} tokens, more than the {} of the cache",
                    pool.num_blocks()
                ),
            ));
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.queue.push_back(Active {
            id,
            job,
            outputs: JobOutputs::default(),
            prompt_tokens: prompt.len() + spec.virtual_tokens,
            submitted: Instant::now(),
            admitted: None,
            first_output: None,
            preemptions: 0,
        });
        Ok(id)
    }

    /// True when no request is queued, preempted or running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.preempted.is_empty() && self.running.is_empty()
    }

    /// Requests submitted and not finished.
    pub fn unfinished(&self) -> usize {
        self.queue.len() + self.preempted.len() + self.running.len()
    }

    /// Counts so far.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// The decoder the requests run on.
    pub fn decoder(&self) -> &Decoder<'m, B> {
        &self.decoder
    }

    /// Ends a request now (the caller's stop): it finishes with what it generated so far and
    /// [`FinishReason::Stopped`]. None if it is not unfinished.
    pub fn cancel(&mut self, request: RequestId) -> Option<Event> {
        let take = |list: &mut Vec<Active<'t, B>>| list.iter().position(|a| a.id == request).map(|i| list.remove(i));
        let active = take(&mut self.running)
            .or_else(|| take(&mut self.preempted))
            .or_else(|| self.queue.iter().position(|a| a.id == request).and_then(|i| self.queue.remove(i)))?;
        Some(self.complete(active, Ok(FinishReason::Stopped)))
    }

    /// One round: admits what fits, runs one batched step, hands every job its outputs. Returns
    /// what happened to each request. An error here is the backend's and ends the scheduler's
    /// usefulness; a request's own failure is reported in its [`Event::Finished`].
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        self.admit(&mut events);
        let plan = self.plan();
        if plan.is_empty() {
            // Running requests always have something to run; one that does not would wait forever.
            for active in std::mem::take(&mut self.running) {
                let error = Error::invalid("scheduler", "the request waits on outputs no step will bring (a bug)");
                events.push(self.complete(active, Err(error)));
            }
            return Ok(events);
        }
        self.stats.steps += 1;
        self.stats.rows += plan.iter().map(|&(_, n)| n as u64).sum::<u64>();
        self.stats.peak_sequences = self.stats.peak_sequences.max(plan.len());
        let owner: HashMap<SeqId, RequestId> =
            self.running.iter().flat_map(|a| a.job.sequences().into_iter().map(move |s| (s, a.id))).collect();
        let step = match self.decoder.run_step_for(&plan) {
            Ok(step) => step,
            Err(e) => {
                // The step changed nothing; the requests it would have run fail with its error.
                let failed: Vec<RequestId> = plan.iter().filter_map(|(s, _)| owner.get(s).copied()).collect::<Vec<_>>();
                let message = e.to_string();
                for id in dedup(failed) {
                    if let Some(i) = self.running.iter().position(|a| a.id == id) {
                        let active = self.running.remove(i);
                        let error = Error::invalid("step", message.clone());
                        events.push(self.complete(active, Err(error)));
                    }
                }
                return Ok(events);
            }
        };
        let wants_scores: HashMap<RequestId, bool> =
            self.running.iter().map(|a| (a.id, a.job.needs_scores())).collect();
        let needs = |seq: &SeqId| owner.get(seq).and_then(|id| wants_scores.get(id)).copied().unwrap_or(true);
        // Only ids leave the backend unless some job in the step needs scores.
        let sequences = step.sequences().to_vec();
        let collected = if sequences.iter().any(needs) {
            step.into_outputs().map(|o| o.into_iter().map(|o| (o.seq, SeqOutput::Full(o))).collect::<Vec<_>>())
        } else {
            step.argmax().map(|best| sequences.iter().copied().zip(best.into_iter().map(SeqOutput::Best)).collect())
        };
        let outputs = match collected {
            Ok(outputs) => outputs,
            Err(Error::NonFinite { row, what }) => {
                // One request's scores are not finite: that request fails. The others of the step
                // lost their outputs with the error; they run again (recomputed) at the next step.
                let failed = sequences.get(row).and_then(|s| owner.get(s)).copied();
                let ran: Vec<RequestId> = dedup(sequences.iter().filter_map(|s| owner.get(s).copied()).collect());
                for id in ran {
                    let Some(i) = self.running.iter().position(|a| a.id == id) else { continue };
                    if Some(id) == failed {
                        let active = self.running.remove(i);
                        events.push(self.complete(active, Err(Error::NonFinite { row, what: what.clone() })));
                    } else {
                        let active = &mut self.running[i];
                        for seq in active.job.sequences() {
                            self.decoder.evict(seq).ok();
                        }
                        active.outputs.clear();
                    }
                }
                return Ok(events);
            }
            Err(e) => return Err(e),
        };
        for (seq, output) in outputs {
            let Some(id) = owner.get(&seq) else { continue };
            if let Some(active) = self.running.iter_mut().find(|a| a.id == *id) {
                active.outputs.insert(seq, output);
            }
        }
        self.advance(&mut events);
        Ok(events)
    }

    /// Runs every request to its end, calling `on_event` with each event.
    pub fn run_to_end(&mut self, mut on_event: impl FnMut(Event)) -> Result<()> {
        while !self.is_idle() {
            for event in self.step()? {
                on_event(event);
            }
        }
        Ok(())
    }

    /// Moves preempted requests, then queued ones, into the running set while slots and cache
    /// blocks for their prompts remain.
    fn admit(&mut self, events: &mut Vec<Event>) {
        let block_size = self.decoder.pool().block_size();
        loop {
            let width: usize = self.running.iter().map(|a| a.job.width()).sum();
            let from_preempted = !self.preempted.is_empty();
            let next = if from_preempted { self.preempted.first() } else { self.queue.front() };
            let Some(next) = next else { return };
            if width + next.job.width() > self.options.max_sequences {
                return;
            }
            // Room for its prompt (or, preempted, everything it recomputes), when others run.
            let tokens = if from_preempted {
                next.job.sequences().iter().map(|&s| self.decoder.pending(s).unwrap_or(0)).sum()
            } else {
                next.prompt_tokens
            };
            if !self.running.is_empty() && tokens.div_ceil(block_size) + 1 > self.decoder.pool().free_blocks() {
                return;
            }
            let mut active = if from_preempted {
                self.preempted.remove(0)
            } else {
                match self.queue.pop_front() {
                    Some(active) => active,
                    None => return,
                }
            };
            if active.admitted.is_none() {
                active.admitted = Some(Instant::now());
                match active.job.start(&mut self.decoder) {
                    Ok(None) => {}
                    Ok(Some(finish)) => {
                        events.push(self.complete(active, Ok(finish)));
                        continue;
                    }
                    Err(e) => {
                        events.push(self.complete(active, Err(e)));
                        continue;
                    }
                }
            }
            self.running.push(active);
        }
    }

    /// The step's sequences and how many tokens each runs: every decoding sequence, then prompt
    /// chunks oldest first within the token budget. When the cache cannot hold it, the newest
    /// requests are preempted until it can (the oldest one always runs).
    fn plan(&mut self) -> Vec<(SeqId, usize)> {
        loop {
            let mut plan: Vec<(SeqId, usize)> = Vec::new();
            let mut prompts: Vec<(SeqId, usize)> = Vec::new();
            for active in &self.running {
                for seq in active.job.waiting_on() {
                    match self.decoder.pending(seq) {
                        Ok(1) => plan.push((seq, 1)),
                        Ok(0) | Err(_) => {}
                        Ok(n) => prompts.push((seq, n)),
                    }
                }
            }
            let mut budget = self.options.max_step_tokens;
            for (seq, n) in prompts {
                // The oldest prompt always makes progress, whatever the budget.
                let run = if plan.is_empty() { n.min(budget.max(1)) } else { n.min(budget) };
                if run > 0 {
                    plan.push((seq, run));
                    budget = budget.saturating_sub(run);
                }
            }
            let needed: usize = plan.iter().map(|&(s, n)| self.decoder.blocks_needed(s, n).unwrap_or(0)).sum();
            if needed <= self.decoder.pool().free_blocks() || self.running.len() <= 1 {
                return plan;
            }
            self.preempt_newest();
        }
    }

    /// Evicts the newest running request's sequences and puts it among the preempted.
    fn preempt_newest(&mut self) {
        let Some(mut active) = self.running.pop() else { return };
        // Counted when it gave blocks back (not when it was only admitted and sent back at once).
        let held = active.job.sequences().iter().any(|&s| self.decoder.block_table(s).is_ok_and(|t| !t.is_empty()));
        for seq in active.job.sequences() {
            // A sequence the job holds is in the decoder; an error here would be a bookkeeping bug,
            // and leaving it in place only costs memory.
            self.decoder.evict(seq).ok();
        }
        active.outputs.clear();
        if held {
            active.preemptions += 1;
            self.stats.preemptions += 1;
        }
        let at = self.preempted.partition_point(|p| p.id < active.id);
        self.preempted.insert(at, active);
    }

    /// Hands every request whose awaited outputs are all here its outputs.
    fn advance(&mut self, events: &mut Vec<Event>) {
        let mut i = 0;
        while i < self.running.len() {
            let active = &mut self.running[i];
            let ready = active
                .job
                .waiting_on()
                .iter()
                .all(|&s| active.outputs.has(s) && self.decoder.pending(s).is_ok_and(|p| p == 0));
            if !ready {
                i += 1;
                continue;
            }
            if active.first_output.is_none() {
                active.first_output = active.admitted.map(|t| t.elapsed().as_secs_f64());
            }
            let mut stream = Vec::new();
            let result = active.job.advance(&mut self.decoder, &mut active.outputs, &mut stream);
            active.outputs.clear();
            if !stream.is_empty() {
                events.push(Event::Tokens { request: active.id, ids: stream });
            }
            match result {
                Ok(None) => i += 1,
                Ok(Some(finish)) => {
                    let active = self.running.remove(i);
                    events.push(self.complete(active, Ok(finish)));
                }
                Err(e) => {
                    let active = self.running.remove(i);
                    events.push(self.complete(active, Err(e)));
                }
            }
        }
    }

    /// Releases what a request holds and reports how it ended.
    fn complete(&mut self, mut active: Active<'t, B>, finish: Result<FinishReason>) -> Event {
        let sequences = active.job.finish(&mut self.decoder);
        let now = Instant::now();
        let result = finish.map(|finish| {
            let queued_s = active.admitted.unwrap_or(now).duration_since(active.submitted).as_secs_f64();
            let running_s = active.admitted.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
            let prefill_s = active.first_output.unwrap_or(running_s);
            Completion {
                generation: Generation {
                    ids: sequences.first().cloned().unwrap_or_default(),
                    sequences,
                    finish,
                    prompt_tokens: active.prompt_tokens,
                    prefill_s,
                    decode_s: running_s - prefill_s,
                },
                queued_s,
                preemptions: active.preemptions,
            }
        });
        Event::Finished { request: active.id, result }
    }
}

fn dedup(mut ids: Vec<RequestId>) -> Vec<RequestId> {
    ids.sort_unstable();
    ids.dedup();
    ids
}
