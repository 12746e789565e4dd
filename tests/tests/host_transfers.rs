//! No step of any plan or strategy moves activations to the host and back: a counting backend
//! wrapped around the CPU sees one step layout handed over per step, no tensor uploaded at all, and
//! only what the caller asked for brought back (for plain greedy decoding, only the chosen ids).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use layerwise::analysis::lens::{logit_lens, LensDecoder, LensOptions};
use layerwise::exits::{Contrast, ExitPlan, PlanOptions, Projection, Upper};
use layerwise::generation::{
    generate, BeamOptions, ContrastiveOptions, DolaLayers, DolaOptions, GenerationOptions, SampleOptions,
    SamplingOptions, Strategy,
};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load_on, Cpu, InspectRequest};
use layerwise_tests::counting::{Counting, Transfers};
use layerwise_tests::fixture_str;

fn plans() -> Vec<(&'static str, PlanOptions)> {
    let contrast = |upper, lower, projection| PlanOptions {
        plan: ExitPlan::Contrast { upper, lower },
        projection,
        ..Default::default()
    };
    let custom = PlanOptions {
        contrast: Contrast::Custom(Arc::new(|u: &[f32], l: &[f32], out: &mut [f32]| {
            for ((o, u), l) in out.iter_mut().zip(u).zip(l) {
                *o = u - 0.5 * l;
            }
        })),
        ..contrast(Upper::Layer(4), 2, Projection::ExitHeads)
    };
    vec![
        ("original", PlanOptions::default()),
        ("exit 2", PlanOptions { plan: ExitPlan::Exit(2), ..Default::default() }),
        ("acd 4 vs 2", contrast(Upper::Layer(4), 2, Projection::ExitHeads)),
        ("acd original vs 2, lens", contrast(Upper::Original, 2, Projection::Lens)),
        ("custom contrast", custom),
    ]
}

fn strategies() -> Vec<(&'static str, Strategy)> {
    let sampling = SamplingOptions { seed: 7, ..Default::default() };
    vec![
        ("greedy", Strategy::Greedy),
        ("sample", Strategy::Sample(SampleOptions { sampling: sampling.clone(), num_return_sequences: 2 })),
        ("beam 3", Strategy::Beam(BeamOptions { num_beams: 3, ..Default::default() })),
        ("contrastive", Strategy::Contrastive(ContrastiveOptions { penalty_alpha: 0.6, top_k: 4 })),
        (
            "dola",
            Strategy::Dola(DolaOptions {
                layers: DolaLayers::List(vec![0, 1]),
                sampling: None,
                num_return_sequences: 1,
            }),
        ),
    ]
}

fn reset(t: &Transfers) {
    for counter in [&t.uploads, &t.downloads, &t.steps, &t.argmaxes, &t.round_trips] {
        counter.store(0, Ordering::SeqCst);
    }
}

#[test]
fn no_step_of_any_plan_or_strategy_uploads_a_tensor() {
    let (backend, transfers) = Counting::new(Cpu::default());
    let loaded = load_on(&fixture_str("gpt2-sharded"), backend).expect("load");
    let mut runs = 0;
    for (plan_name, plan) in plans() {
        for (strategy_name, strategy) in strategies() {
            let options = GenerationOptions { max_new_tokens: 5, strategy, ..Default::default() };
            let cache_tokens = Some(options.cache_tokens(3));
            let decoder_options = DecoderOptions { plan: plan.clone(), cache_tokens, ..Default::default() };
            let mut decoder = Decoder::new(&loaded.model, decoder_options).expect("decoder");
            reset(&transfers);
            let out = generate(&mut decoder, &[5, 17, 42], &options, None, |_| true).expect("generate");
            let (uploads, downloads, steps, argmaxes, round_trips) = transfers.get();
            let what = format!("{plan_name} / {strategy_name}");
            assert!(!out.ids.is_empty(), "{what}");
            assert_eq!(uploads, 0, "{what}: a tensor was uploaded");
            assert_eq!(round_trips, 0, "{what}: an upload followed a download");
            assert!(steps >= out.ids.len(), "{what}: one step layout per step ({steps} for {} tokens)", out.ids.len());
            if strategy_name == "greedy" && plan_name != "custom contrast" {
                // Only the chosen ids came back.
                assert_eq!(downloads, 0, "{what}: scores came back");
                assert_eq!(argmaxes, steps, "{what}");
            }
            runs += 1;
        }
    }
    assert_eq!(runs, 25);
}

#[test]
fn inspection_and_the_lens_bring_back_only_what_they_return() {
    let (backend, transfers) = Counting::new(Cpu::default());
    let loaded = load_on(&fixture_str("gpt2-sharded"), backend).expect("load");
    let model = &loaded.model;
    for decoder in
        [LensDecoder::Final, LensDecoder::Exits, LensDecoder::Through(vec![(3, layerwise::model::BlockPart::Mlp)])]
    {
        reset(&transfers);
        let lens = logit_lens(model, &[5, 17, 42, 7], &LensOptions { decoder, ..Default::default() }).expect("lens");
        let (uploads, downloads, steps, _, _) = transfers.get();
        assert_eq!(uploads, 0);
        // One prompt pass (plus one for the blocks a "through" decoder runs per row); the final
        // logits and one row of logits per lens row come back.
        assert!(steps >= 1 && downloads == lens.rows.len() + 1, "{downloads} downloads for {} rows", lens.rows.len());
    }
    reset(&transfers);
    let request =
        InspectRequest { points: vec![model.point("h.1").expect("point")], attentions: vec![0], ..Default::default() };
    model.inspect(&[5, 17, 42], &request).expect("inspect");
    let (uploads, downloads, steps, _, _) = transfers.get();
    assert_eq!((uploads, downloads, steps), (0, 2, 1), "one activation and one attention map come back");
}
