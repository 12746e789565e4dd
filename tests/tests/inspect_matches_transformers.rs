//! Activations by name, attention probabilities, head masks and the logit lens against what
//! transformers 4.48 shows inside the fixture checkpoints (tools/scripts/make_inspect_fixtures.py).

use std::collections::HashMap;

use layerwise::analysis::lens::{logit_lens, Lens, LensDecoder, LensOptions};
use layerwise::model::{HeadMask, InspectRequest, Point};
use layerwise::Model;
use layerwise_tests::{assert_close, fixture, fixture_str, ids, read_safetensors, Recorded};

const FIXTURES: [&str; 3] = ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"];

struct Reference {
    model: Model<layerwise::Cpu>,
    tensors: HashMap<String, Recorded>,
    meta: serde_json::Value,
    prompt: Vec<u32>,
}

fn reference(name: &str) -> Reference {
    let model = layerwise::load(&fixture_str(name)).expect("fixture loads").model;
    let tensors = read_safetensors(&fixture("inspect").join(format!("{name}.safetensors")));
    let text = std::fs::read_to_string(fixture("inspect").join("lens.json")).expect("lens.json");
    let meta: serde_json::Value = serde_json::from_str(&text).expect("lens.json parses");
    let prompt = ids(&meta["prompt"]);
    Reference { model, tensors, meta, prompt }
}

#[test]
fn activations_by_name_equal_transformers_module_outputs() {
    for name in FIXTURES {
        let r = reference(name);
        let names: Vec<&str> = r.tensors.keys().filter_map(|k| k.strip_prefix("act.")).collect::<Vec<_>>();
        assert!(names.len() > 20, "{name}: the script records every module");
        let points: Vec<Point> = names.iter().map(|n| r.model.point(n).expect("a known point")).collect();
        let seen =
            r.model.inspect(&r.prompt, &InspectRequest { points: points.clone(), ..Default::default() }).unwrap();
        assert_eq!(seen.blocks_run, r.model.spec().num_layers, "{name}: ln_f needs every block");
        for (n, point) in names.iter().zip(&points) {
            assert_eq!(&r.model.point_name(*point), n, "names round-trip");
            assert_close(&format!("{name} {n}"), &seen.activations[point], &r.tensors[&format!("act.{n}")], 1e-4);
        }
    }
}

#[test]
fn partial_forward_stops_after_the_deepest_point_and_equals_the_full_pass() {
    let r = reference("gpt2-sharded");
    let full = r
        .model
        .inspect(
            &r.prompt,
            &InspectRequest {
                points: vec![r.model.point("h.1.attn").unwrap(), r.model.point("ln_f").unwrap()],
                ..Default::default()
            },
        )
        .unwrap();
    for (name, blocks) in [("embed", 0), ("h.0.ln_1", 1), ("h.1.attn", 2), ("h.2", 3), ("transformer.h.3.mlp", 4)] {
        let point = r.model.point(name).unwrap();
        let seen = r.model.inspect(&r.prompt, &InspectRequest { points: vec![point], ..Default::default() }).unwrap();
        assert_eq!(seen.blocks_run, blocks, "{name}");
        if name == "h.1.attn" {
            assert_eq!(seen.activations[&point], full.activations[&point], "the same numbers as the full pass");
        }
    }
    let attention_only =
        r.model.inspect(&r.prompt, &InspectRequest { attentions: vec![1], ..Default::default() }).unwrap();
    assert_eq!(attention_only.blocks_run, 2);
}

#[test]
fn unknown_points_and_bad_masks_are_refused_by_name() {
    let r = reference("gpt2-sharded");
    for bad in ["h.9", "h.x", "h.1.c_fc", "layers.1", "blocks"] {
        let err = r.model.point(bad).expect_err(bad).to_string();
        assert!(err.contains(bad), "{err}");
    }
    let llama = reference("llama-bf16");
    assert!(llama.model.point("layers.2.self_attn").is_ok());
    assert!(llama.model.point("h.2.attn").is_err());
    let mask = HeadMask::ones(3, 4);
    let err = r
        .model
        .inspect(&r.prompt, &InspectRequest { head_mask: Some(mask), logits: true, ..Default::default() })
        .expect_err("3 layers for a 4-layer model")
        .to_string();
    assert!(err.contains("head mask"), "{err}");
}

#[test]
fn attention_probabilities_equal_output_attentions() {
    for name in FIXTURES {
        let r = reference(name);
        let n = r.model.spec().num_layers;
        let seen =
            r.model.inspect(&r.prompt, &InspectRequest { attentions: (0..n).collect(), ..Default::default() }).unwrap();
        for block in 0..n {
            let reference = &r.tensors[&format!("attn.{block}")];
            assert_close(&format!("{name} attention {block}"), &seen.attentions[&block], reference, 1e-5);
        }
    }
}

#[test]
fn head_masked_logits_equal_transformers_head_mask() {
    for name in ["gpt2-sharded", "gpt-neo-bin"] {
        let r = reference(name);
        let recorded = &r.tensors["head_mask"];
        let heads = recorded.shape[1];
        let rows: Vec<Vec<f32>> =
            recorded.values.chunks(heads).map(|c| c.iter().map(|&v| v as f32).collect()).collect();
        let mask = HeadMask::from_rows(&rows).unwrap();
        assert_eq!(mask.masked().len(), 3);
        let request = InspectRequest { head_mask: Some(mask), logits: true, attentions: vec![1], ..Default::default() };
        let seen = r.model.inspect(&r.prompt, &request).unwrap();
        assert_close(
            &format!("{name} masked logits"),
            seen.logits.as_ref().unwrap(),
            &r.tensors["masked.logits"],
            1e-4,
        );
        assert_close(&format!("{name} masked attention"), &seen.attentions[&1], &r.tensors["masked.attn.1"], 1e-5);
        // And masking changed something.
        let plain = r.model.inspect(&r.prompt, &InspectRequest { logits: true, ..Default::default() }).unwrap();
        assert_close(&format!("{name} logits"), plain.logits.as_ref().unwrap(), &r.tensors["logits"], 1e-4);
        assert!(relative(plain.logits.as_ref().unwrap(), &r.tensors["masked.logits"]) > 1e-3);
    }
}

fn relative(actual: &[f32], reference: &Recorded) -> f64 {
    layerwise_tests::relative_error(actual, &reference.values)
}

fn check_lens(r: &Reference, name: &str, key: &str, lens: &Lens) {
    let rows: Vec<String> = serde_json::from_value(r.meta[name][key].clone()).unwrap();
    assert_eq!(lens.rows, rows, "{name} {key}: rows");
    let stat = |s: &str| &r.tensors[&format!("lens.{key}.{s}")];
    let flat_ids: Vec<f64> = lens.top_ids.iter().flatten().flatten().map(|&i| i as f64).collect();
    assert_eq!(flat_ids, stat("top_ids").values, "{name} {key}: top ids");
    let flat = |v: &Vec<Vec<f32>>| v.iter().flatten().copied().collect::<Vec<f32>>();
    let top_probs: Vec<f32> = lens.top_probs.iter().flatten().flatten().copied().collect();
    assert_close(&format!("{name} {key} top probs"), &top_probs, stat("top_probs"), 1e-4);
    assert_close(&format!("{name} {key} entropy"), &flat(&lens.entropy), stat("entropy"), 1e-4);
    // KL is near zero on the last row: compare in absolute terms.
    let kl = flat(&lens.kl_to_final);
    let worst = kl.iter().zip(&stat("kl_to_final").values).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "{name} {key}: KL differs by {worst:e}");
    let ranks = |v: &Vec<Vec<u32>>| v.iter().flatten().map(|&x| x as f64).collect::<Vec<f64>>();
    assert_eq!(
        ranks(&lens.final_top_rank),
        stat("final_top_rank").values,
        "{name} {key}: ranks of the final top token"
    );
    assert_eq!(ranks(&lens.next_rank), stat("next_rank").values, "{name} {key}: ranks of the next token");
}

#[test]
fn logit_lens_equals_transformers_states_through_the_same_decoder() {
    let k = 3;
    for name in FIXTURES {
        let r = reference(name);
        let blocks = r.model.module_names().blocks;
        let last = r.model.spec().num_layers - 1;
        let cases = [
            ("final", LensDecoder::Final, false),
            ("subblocks", LensDecoder::Final, true),
            ("last_mlp", LensDecoder::parse(&r.model, &format!("{blocks}.{last}.mlp")).unwrap(), false),
            ("last_block", LensDecoder::parse(&r.model, &format!("{blocks}.{last}")).unwrap(), false),
            ("exits", LensDecoder::Exits, false),
            ("converted", LensDecoder::Converted, false),
        ];
        for (key, decoder, subblocks) in cases {
            if r.meta[name].get(key).is_none() {
                continue; // no conversion matrices in this checkpoint
            }
            let lens = logit_lens(&r.model, &r.prompt, &LensOptions { decoder, subblocks, top_k: k }).unwrap();
            check_lens(&r, name, key, &lens);
        }
        // The default decoder's last row is the model's own distribution.
        let lens = logit_lens(&r.model, &r.prompt, &LensOptions { top_k: k, ..Default::default() }).unwrap();
        let top_row = lens.top_ids.last().unwrap();
        assert!(top_row.iter().zip(&lens.final_top).all(|(cell, &f)| cell[0] == f));
    }
}

#[test]
fn lens_options_are_checked() {
    let r = reference("gpt2-sharded");
    let err = logit_lens(&r.model, &r.prompt, &LensOptions { decoder: LensDecoder::Exits, subblocks: true, top_k: 3 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("subblocks"), "{err}");
    let err = logit_lens(&r.model, &r.prompt, &LensOptions { top_k: 0, ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("top_k"), "{err}");
    let err = LensDecoder::parse(&r.model, "h.3.ln_2").unwrap_err().to_string();
    assert!(err.contains("decoder") && err.contains("h.3.ln_2"), "{err}");
    let converted =
        logit_lens(&r.model, &r.prompt, &LensOptions { decoder: LensDecoder::Converted, ..Default::default() })
            .unwrap();
    assert_eq!(converted.rows, ["h.0", "h.1", "h.3"]);
}
