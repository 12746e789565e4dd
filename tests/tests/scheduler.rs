//! Continuous batching: every request a scheduler runs (mixed strategies, prompt lengths and
//! limits, beside each other, in chunks, preempted and recomputed) generates what it generates on
//! its own with `generate` (which matches transformers, see the strategy tests); slots are
//! refilled as soon as a request ends; a long prompt never stalls the decoding sequences; a full
//! cache preempts instead of failing.

use std::collections::HashMap;

use layerwise::exits::{ExitPlan, PlanOptions, Upper};
use layerwise::generation::scheduler::Completion;
use layerwise::generation::{
    generate, BeamOptions, ContrastiveOptions, DolaLayers, DolaOptions, Event, FinishReason, GenerationOptions,
    ProcessorOptions, Request, RequestId, SampleOptions, SamplingOptions, Scheduler, SchedulerOptions, Strategy,
};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load, LoadedModel};
use layerwise_tests::fixture_str;

/// A prompt of `n` ids drawn from the vocabulary.
fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + salt * 104_729) % 50_000 + 10).collect()
}

/// Requests of every strategy, prompts of 1 to 40 tokens, output limits of 0 to 12.
fn mixed_requests() -> Vec<Request> {
    let greedy = |max| GenerationOptions { max_new_tokens: max, ..Default::default() };
    let sampled = |seed| GenerationOptions {
        max_new_tokens: 9,
        strategy: Strategy::Sample(SampleOptions {
            sampling: SamplingOptions { top_k: 20, temperature: 0.8, seed, ..Default::default() },
            num_return_sequences: 2,
        }),
        ..Default::default()
    };
    let beams = GenerationOptions {
        max_new_tokens: 7,
        eos_token_ids: vec![50256],
        strategy: Strategy::Beam(BeamOptions { num_beams: 3, num_return_sequences: 2, ..Default::default() }),
        ..Default::default()
    };
    let contrastive = GenerationOptions {
        max_new_tokens: 6,
        strategy: Strategy::Contrastive(ContrastiveOptions { penalty_alpha: 0.6, top_k: 3 }),
        ..Default::default()
    };
    let dola = GenerationOptions {
        max_new_tokens: 5,
        strategy: Strategy::Dola(DolaOptions {
            layers: DolaLayers::List(vec![0, 1]),
            sampling: None,
            num_return_sequences: 1,
        }),
        ..Default::default()
    };
    let penalized = GenerationOptions {
        max_new_tokens: 12,
        processors: ProcessorOptions { repetition_penalty: 1.3, no_repeat_ngram_size: 2 },
        ..Default::default()
    };
    vec![
        Request { prompt: prompt(3, 1), options: greedy(12) },
        Request { prompt: prompt(40, 2), options: greedy(10) },
        Request { prompt: prompt(1, 3), options: sampled(7) },
        Request { prompt: prompt(17, 4), options: beams },
        Request { prompt: prompt(25, 5), options: contrastive },
        Request { prompt: prompt(9, 6), options: dola },
        Request { prompt: prompt(33, 7), options: penalized },
        Request { prompt: prompt(5, 8), options: greedy(0) },
        Request { prompt: prompt(12, 9), options: greedy(1) },
        Request { prompt: prompt(30, 10), options: sampled(99) },
    ]
}

fn decoder<'m>(loaded: &'m LoadedModel, plan: &PlanOptions, cache_tokens: usize) -> Decoder<'m, layerwise::Cpu> {
    let options =
        DecoderOptions { plan: plan.clone(), block_size: 4, cache_tokens: Some(cache_tokens), head_mask: None };
    Decoder::new(&loaded.model, options).expect("decoder")
}

/// Each request generated alone.
fn alone(loaded: &LoadedModel, plan: &PlanOptions, requests: &[Request]) -> Vec<(Vec<Vec<u32>>, FinishReason)> {
    requests
        .iter()
        .map(|r| {
            let mut decoder = decoder(loaded, plan, 1024);
            let g =
                generate(&mut decoder, &r.prompt, &r.options, loaded.tokenizer.as_ref(), |_| true).expect("generate");
            (g.sequences, g.finish)
        })
        .collect()
}

/// Runs every request through one scheduler: each one's completion, its streamed ids, and the
/// number of sequences of every step.
struct Batched {
    completions: HashMap<RequestId, Completion>,
    streamed: HashMap<RequestId, Vec<u32>>,
    ids: Vec<RequestId>,
    stats: layerwise::generation::scheduler::SchedulerStats,
}

fn batched(
    loaded: &LoadedModel,
    plan: &PlanOptions,
    requests: &[Request],
    cache_tokens: usize,
    options: SchedulerOptions,
) -> Batched {
    let mut scheduler = Scheduler::new(decoder(loaded, plan, cache_tokens), loaded.tokenizer.as_ref(), options);
    let ids: Vec<RequestId> = requests.iter().map(|r| scheduler.submit(r.clone()).expect("submit")).collect();
    let mut completions = HashMap::new();
    let mut streamed: HashMap<RequestId, Vec<u32>> = HashMap::new();
    scheduler
        .run_to_end(|event| match event {
            Event::Tokens { request, ids } => streamed.entry(request).or_default().extend(ids),
            Event::Finished { request, result } => {
                assert!(completions.insert(request, result.expect("request")).is_none(), "finished twice");
            }
        })
        .expect("scheduler");
    assert_eq!(scheduler.decoder().pool().free_blocks(), scheduler.decoder().pool().num_blocks(), "blocks leaked");
    Batched { completions, streamed, ids, stats: scheduler.stats() }
}

fn assert_same(what: &str, batched: &Batched, alone: &[(Vec<Vec<u32>>, FinishReason)]) {
    for (i, (id, (sequences, finish))) in batched.ids.iter().zip(alone).enumerate() {
        let completion = &batched.completions[id];
        assert_eq!(&completion.generation.sequences, sequences, "{what}: request {i}'s sequences");
        assert_eq!(completion.generation.finish, *finish, "{what}: request {i}'s finish reason");
        let streamed = batched.streamed.get(id).cloned().unwrap_or_default();
        assert_eq!(streamed, completion.generation.ids, "{what}: request {i} streamed its first sequence");
    }
}

#[test]
fn a_batch_generates_what_each_request_generates_alone() {
    let loaded = load(&fixture_str("demo-gpt2-multiexit")).expect("load");
    let requests = mixed_requests();
    for plan in [
        PlanOptions::default(),
        PlanOptions { plan: ExitPlan::Exit(2), ..Default::default() },
        PlanOptions { plan: ExitPlan::Contrast { upper: Upper::Layer(4), lower: 2 }, ..Default::default() },
    ] {
        let reference = alone(&loaded, &plan, &requests);
        let options = SchedulerOptions { max_sequences: 16, max_step_tokens: 16 };
        let run = batched(&loaded, &plan, &requests, 1024, options);
        assert_same(&format!("{:?}", plan.plan), &run, &reference);
        assert_eq!(run.stats.preemptions, 0, "a large cache never preempts");
        assert!(run.stats.peak_sequences > 4, "requests ran side by side: {:?}", run.stats);
    }
}

#[test]
fn a_full_cache_preempts_and_every_request_still_completes() {
    let loaded = load(&fixture_str("demo-gpt2-multiexit")).expect("load");
    let plan = PlanOptions::default();
    let requests = mixed_requests();
    let reference = alone(&loaded, &plan, &requests);
    // 160 slots: enough for the largest request alone (contrastive search's 4 sequences of up to
    // 31 tokens), far from enough for all of them.
    let run = batched(&loaded, &plan, &requests, 160, SchedulerOptions { max_sequences: 16, max_step_tokens: 64 });
    assert!(run.stats.preemptions > 0, "the cache was filled on purpose: {:?}", run.stats);
    assert_same("preempted", &run, &reference);
    let preempted: usize = run.completions.values().map(|c| c.preemptions).sum();
    assert_eq!(preempted as u64, run.stats.preemptions);
}

#[test]
fn a_request_that_can_never_fit_is_refused_at_submission() {
    let loaded = load(&fixture_str("demo-gpt2-multiexit")).expect("load");
    let mut scheduler =
        Scheduler::new(decoder(&loaded, &PlanOptions::default(), 32), None, SchedulerOptions::default());
    let beams = GenerationOptions {
        max_new_tokens: 20,
        strategy: Strategy::Beam(BeamOptions { num_beams: 4, ..Default::default() }),
        ..Default::default()
    };
    let error = scheduler.submit(Request { prompt: prompt(10, 1), options: beams }).expect_err("too large");
    assert!(error.to_string().contains("cache_tokens"), "{error}");
    let wide = GenerationOptions {
        strategy: Strategy::Contrastive(ContrastiveOptions { penalty_alpha: 0.5, top_k: 40 }),
        ..Default::default()
    };
    let error = scheduler.submit(Request { prompt: prompt(2, 1), options: wide }).expect_err("too wide");
    assert!(error.to_string().contains("max_sequences"), "{error}");
    let long = GenerationOptions { max_new_tokens: 60, ..Default::default() };
    let error = scheduler.submit(Request { prompt: prompt(10, 1), options: long }).expect_err("past the context");
    assert!(error.to_string().contains("max_new_tokens"), "{error}");
    assert!(scheduler.is_idle());
}

#[test]
fn finished_slots_are_refilled_at_once() {
    let loaded = load(&fixture_str("demo-gpt2-multiexit")).expect("load");
    let decoder = decoder(&loaded, &PlanOptions::default(), 1024);
    let mut scheduler = Scheduler::new(decoder, None, SchedulerOptions { max_sequences: 3, max_step_tokens: 512 });
    // Single-token prompts: every step of a running request is one row, so a step's rows are the
    // requests it ran.
    for (i, max) in [5, 2, 8, 1, 4, 6, 3, 7].into_iter().enumerate() {
        let options = GenerationOptions { max_new_tokens: max, ..Default::default() };
        scheduler.submit(Request { prompt: vec![100 + i as u32], options }).expect("submit");
    }
    let mut finished = 0;
    let mut rows_before = 0;
    while !scheduler.is_idle() {
        let waiting_before = scheduler.unfinished();
        let events = scheduler.step().expect("step");
        let rows = scheduler.stats().rows - rows_before;
        rows_before = scheduler.stats().rows;
        if waiting_before >= 3 {
            assert_eq!(rows, 3, "three slots stay busy while requests wait");
        }
        finished += events.iter().filter(|e| matches!(e, Event::Finished { .. })).count();
    }
    assert_eq!(finished, 8);
    // Three slots kept full: the 15 steps of an ideal refill (simulated by hand: slots free at the
    // end of a step are filled at the start of the next).
    assert_eq!(scheduler.stats().steps, 15, "{:?}", scheduler.stats());
}

#[test]
fn a_long_prompt_does_not_stall_decoding() {
    let loaded = load(&fixture_str("demo-gpt2-multiexit")).expect("load");
    let decoder = decoder(&loaded, &PlanOptions::default(), 1024);
    let mut scheduler = Scheduler::new(decoder, None, SchedulerOptions { max_sequences: 4, max_step_tokens: 8 });
    let short = scheduler
        .submit(Request {
            prompt: prompt(2, 1),
            options: GenerationOptions { max_new_tokens: 12, ..Default::default() },
        })
        .expect("submit");
    scheduler.step().expect("the short prompt runs");
    let long = scheduler
        .submit(Request {
            prompt: prompt(50, 2),
            options: GenerationOptions { max_new_tokens: 4, ..Default::default() },
        })
        .expect("submit");
    // 50 prompt tokens in chunks of 8: seven steps, and the short request gets a token in each.
    let mut long_first_token = None;
    for step in 0..8 {
        let events = scheduler.step().expect("step");
        let got = |id: RequestId| events.iter().any(|e| matches!(e, Event::Tokens { request, .. } if *request == id));
        assert!(got(short), "step {step}: the decoding request got no token");
        if got(long) && long_first_token.is_none() {
            long_first_token = Some(step);
        }
    }
    assert_eq!(long_first_token, Some(6), "the long prompt's first token comes with its last chunk");
}

#[test]
fn a_cancelled_request_ends_with_what_it_has() {
    let loaded = load(&fixture_str("demo-gpt2-multiexit")).expect("load");
    let decoder = decoder(&loaded, &PlanOptions::default(), 1024);
    let mut scheduler = Scheduler::new(decoder, None, SchedulerOptions::default());
    let options = GenerationOptions { max_new_tokens: 20, ..Default::default() };
    let id = scheduler.submit(Request { prompt: prompt(4, 1), options }).expect("submit");
    for _ in 0..3 {
        scheduler.step().expect("step");
    }
    match scheduler.cancel(id) {
        Some(Event::Finished { result, .. }) => {
            let completion = result.expect("completion");
            assert_eq!(completion.generation.finish, FinishReason::Stopped);
            assert_eq!(completion.generation.ids.len(), 3);
        }
        other => panic!("expected a finished event, got {other:?}"),
    }
    assert!(scheduler.is_idle());
    assert!(scheduler.cancel(id).is_none());
    assert_eq!(scheduler.decoder().pool().free_blocks(), scheduler.decoder().pool().num_blocks());
}

#[test]
fn non_finite_scores_fail_their_request_and_nothing_else_hangs() {
    // A final norm whose gain is NaN for one prompt's worth of rows is hard to make; a NaN gain makes
    // every request's scores NaN instead: each fails on its own (named non-finite), the others in the
    // same step run again, and the scheduler ends idle.
    let files = layerwise::ModelFiles::resolve(&fixture_str("gpt2-sharded")).expect("files");
    let spec = layerwise::ModelSpec::from_file(&files.config).expect("spec");
    let mut weights = layerwise::io::open_weights(&files.weights).expect("weights");
    let name = "transformer.ln_f.weight";
    let width = weights.get(name).expect("ln_f").numel();
    weights.replace(name, layerwise::HostTensor::from_f32(vec![f32::NAN; width], vec![width]));
    let model = layerwise::Model::load(spec, &weights, layerwise::Cpu::default()).expect("model");
    let decoder =
        Decoder::new(&model, DecoderOptions { cache_tokens: Some(256), ..Default::default() }).expect("decoder");
    let mut scheduler = Scheduler::new(decoder, None, SchedulerOptions::default());
    for salt in 0..3 {
        let options = GenerationOptions { max_new_tokens: 4, ..Default::default() };
        scheduler.submit(Request { prompt: vec![3 + salt, 17, 42, 5], options }).expect("submit");
    }
    let mut failures = Vec::new();
    let mut steps = 0;
    while !scheduler.is_idle() {
        steps += 1;
        assert!(steps < 50, "the scheduler does not end");
        for event in scheduler.step().expect("step") {
            if let Event::Finished { result, .. } = event {
                failures.push(result.expect_err("NaN scores").to_string());
            }
        }
    }
    assert_eq!(failures.len(), 3);
    assert!(failures.iter().all(|f| f.contains("non-finite")), "{failures:?}");
}
