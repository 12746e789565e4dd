//! Head importance, the pruning search and physical pruning against transformers 4.48
//! (tools/scripts/make_inspect_fixtures.py: loss with `head_mask`, and the checkpoint that
//! `layerwise heads --prune` wrote, reloaded by transformers).

use layerwise::analysis::heads::{head_entropy, head_importance, lm_loss, prune_checkpoint, prune_search};
use layerwise::model::{HeadMask, InspectRequest};
use layerwise_tests::{assert_close, fixture, fixture_str, ids, read_safetensors};

fn texts() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fixture("inspect").join("texts.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value.as_array().unwrap().iter().map(ids).collect()
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("inspect").join("lens.json")).unwrap()).unwrap()
}

fn recorded_mask(values: &[f64], heads: usize) -> HeadMask {
    let rows: Vec<Vec<f32>> = values.chunks(heads).map(|c| c.iter().map(|&v| v as f32).collect()).collect();
    HeadMask::from_rows(&rows).unwrap()
}

#[test]
fn loss_and_importance_equal_transformers_with_head_mask() {
    let model = layerwise::load(&fixture_str("gpt2-sharded")).unwrap().model;
    let recorded = read_safetensors(&fixture("inspect").join("gpt2-sharded.safetensors"));
    let texts = texts();
    let base = recorded["heads.base_loss"].values[0];
    let loss = lm_loss(&model, &texts, None).unwrap();
    assert!((loss - base).abs() < 1e-5 * base, "loss {loss} vs transformers {base}");
    let importance = head_importance(&model, &texts, None).unwrap();
    let reference = &recorded["heads.importance"].values;
    for (i, increase) in importance.increase.iter().flatten().enumerate() {
        let increase = increase.expect("every head is active");
        assert!((increase - reference[i]).abs() < 1e-5, "head {i}: {increase} vs {}", reference[i]);
    }
}

#[test]
fn pruned_checkpoint_equals_the_masked_model_in_both_engines() {
    let loaded = layerwise::load(&fixture_str("gpt2-sharded")).unwrap();
    let model = &loaded.model;
    let recorded = read_safetensors(&fixture("inspect").join("gpt2-sharded.safetensors"));
    let heads = model.spec().num_heads;
    let meta = meta();
    let threshold = meta["threshold"].as_f64().unwrap();
    let prompt = ids(&meta["prompt"]);

    // The search finds the mask the fixture script pruned with.
    let search = prune_search(model, &texts(), threshold, 1).unwrap();
    let mask = recorded_mask(&recorded["heads.mask"].values, heads);
    assert_eq!(search.mask, mask);
    assert_eq!(search.curve[0].1, search.base_loss);
    assert_eq!(search.order.len(), mask.masked().len());

    let dir = tempfile::tempdir().unwrap();
    let report = prune_checkpoint(model, &loaded.files, &mask, dir.path()).unwrap();
    let removed: usize = mask.masked().len() * {
        let (d, hd) = (model.spec().hidden_size, model.spec().head_dim);
        3 * d * hd + 3 * hd + hd * d
    };
    assert_eq!(report.parameters_before - report.parameters_after, removed);

    let pruned = layerwise::load(dir.path().to_str().unwrap()).unwrap().model;
    assert_eq!(pruned.spec().pruned_heads, report.pruned_heads);
    let logits = |m: &layerwise::Model<layerwise::Cpu>, mask: Option<HeadMask>| {
        let request = InspectRequest { logits: true, head_mask: mask, ..Default::default() };
        m.inspect(&prompt, &request).unwrap().logits.unwrap()
    };
    // transformers reloaded the same files and computed these logits.
    assert_close(
        "pruned (layerwise) vs pruned (transformers)",
        &logits(&pruned, None),
        &recorded["heads.pruned_logits"],
        1e-5,
    );
    assert_close(
        "masked (layerwise) vs masked (transformers)",
        &logits(model, Some(mask.clone())),
        &recorded["heads.masked_logits"],
        1e-5,
    );
    // The mask, read in the original numbering, changes nothing more on the pruned model.
    assert_close("pruned + mask", &logits(&pruned, Some(mask.clone())), &recorded["heads.pruned_logits"], 1e-5);
    // Attention maps of a pruned block hold its remaining heads.
    let seen = pruned.inspect(&prompt, &InspectRequest { attentions: vec![0], ..Default::default() }).unwrap();
    let t = prompt.len();
    assert_eq!(seen.attentions[&0].len(), pruned.spec().kept_heads(0).len() * t * t);

    // Pruning a pruned checkpoint further keeps counting heads in the original numbering.
    let mut more = HeadMask::ones(4, heads);
    let (layer, head) =
        (0..4).flat_map(|l| pruned.spec().kept_heads(l).into_iter().map(move |h| (l, h))).next().unwrap();
    more.set(layer, head, 0.0);
    let again = tempfile::tempdir().unwrap();
    let pruned_files = layerwise::load(dir.path().to_str().unwrap()).unwrap().files;
    let err = prune_checkpoint(&pruned, &pruned_files, &more, again.path()).unwrap_err().to_string();
    assert!(err.contains("every head of block"), "{err}");
}

#[test]
fn entropy_equals_the_entropy_of_transformers_attentions() {
    let model = layerwise::load(&fixture_str("gpt-neo-bin")).unwrap().model;
    let recorded = read_safetensors(&fixture("inspect").join("gpt-neo-bin.safetensors"));
    let prompt = ids(&meta()["prompt"]);
    let t = prompt.len();
    let entropy = head_entropy(&model, &prompt).unwrap();
    for (layer, heads) in entropy.per_token.iter().enumerate() {
        let probs = &recorded[&format!("attn.{layer}")].values;
        for (head, per_query) in heads.iter().enumerate() {
            for (q, &e) in per_query.iter().enumerate() {
                let row = &probs[(head * t + q) * t..(head * t + q + 1) * t];
                let reference: f64 = -row.iter().filter(|&&p| p > 0.0).map(|&p| p * p.ln()).sum::<f64>();
                assert!((e as f64 - reference).abs() < 1e-5, "layer {layer} head {head} query {q}");
            }
            let sum: f32 = per_query.iter().sum();
            assert!((entropy.total[layer][head] - sum).abs() < 1e-5);
        }
    }
}

#[test]
fn impossible_pruning_requests_are_refused() {
    let loaded = layerwise::load(&fixture_str("gpt-neo-bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mask = HeadMask::ones(4, 4);
    let err = prune_checkpoint(&loaded.model, &loaded.files, &mask, dir.path()).unwrap_err().to_string();
    assert!(err.contains("GPT-2"), "{err}");

    let gpt2 = layerwise::load(&fixture_str("gpt2-sharded")).unwrap();
    let mut half = HeadMask::ones(4, 4);
    half.set(1, 1, 0.5);
    let err = prune_checkpoint(&gpt2.model, &gpt2.files, &half, dir.path()).unwrap_err().to_string();
    assert!(err.contains("zeros and ones"), "{err}");
    let mut empty = HeadMask::ones(4, 4);
    (0..4).for_each(|h| empty.set(2, h, 0.0));
    let err = prune_checkpoint(&gpt2.model, &gpt2.files, &empty, dir.path()).unwrap_err().to_string();
    assert!(err.contains("every head of block 2"), "{err}");
    let err = prune_search(&gpt2.model, &texts(), -1.0, 1).unwrap_err().to_string();
    assert!(err.contains("threshold"), "{err}");
    let err = lm_loss(&gpt2.model, &[vec![5]], None).unwrap_err().to_string();
    assert!(err.contains("two or more tokens"), "{err}");
}

/// The texts of tools/scripts/make_head_gradient_fixtures.py.
const GRADIENT_TEXTS: [&[u32]; 3] =
    [&[5, 17, 42, 3, 88, 61, 7, 19, 33, 2], &[9, 0, 73, 26, 50], &[11, 12, 13, 14, 15, 16, 17]];

#[test]
fn lm_head_mask_gradient_importance_entropy_and_their_correlation_equal_transformers() {
    use layerwise::analysis::heads::{entropy_importance, entropy_per_token};
    use layerwise::training::{Head, Network};
    let recorded = read_safetensors(&fixture("head-gradients").join("expected.safetensors"));
    let texts: Vec<Vec<u32>> = GRADIENT_TEXTS.iter().map(|t| t.to_vec()).collect();
    let tokens: usize = texts.iter().map(Vec::len).sum();
    for name in ["gpt2-sharded", "gpt-neo-bin"] {
        let loaded = layerwise::load(&fixture_str(name)).unwrap();
        let spec = loaded.model.spec().clone();
        let weights = layerwise::io::open_weights(&loaded.files.weights).unwrap();
        let network = Network::new(&spec, Some(&weights), 0, false).unwrap();
        let mut masked = HeadMask::ones(spec.num_layers, spec.num_heads);
        masked.set(1, 2, 0.0);
        for (key, mask) in [("", HeadMask::ones(spec.num_layers, spec.num_heads)), ("masked.", masked)] {
            let got = network.head_mask_gradient(&texts, Head::Original, &mask).unwrap();
            let loss = recorded[&format!("{name}.{key}loss")].values[0];
            assert!((got.loss - loss).abs() < 1e-5 * loss, "{name} {key}loss {} vs {loss}", got.loss);
            assert_close(
                &format!("{name} {key}gradient"),
                &got.gradient.concat(),
                &recorded[&format!("{name}.{key}grad")],
                1e-4,
            );
            if !key.is_empty() {
                continue;
            }
            let importance = got.importance();
            assert_close(
                &format!("{name} importance"),
                &importance.concat(),
                &recorded[&format!("{name}.importance")],
                1e-4,
            );
            let entropies = texts.iter().map(|t| head_entropy(&loaded.model, t).unwrap()).collect::<Vec<_>>();
            let entropy = entropy_per_token(&entropies, tokens);
            assert_close(&format!("{name} entropy"), &entropy.concat(), &recorded[&format!("{name}.entropy")], 1e-5);
            let correlation = entropy_importance(&entropy, &importance);
            let expected = recorded[&format!("{name}.correlation")].values[0];
            let coefficient = correlation.coefficient.expect("heads differ");
            assert!((coefficient - expected).abs() < 1e-4, "{name} correlation {coefficient} vs {expected}");
            assert_eq!(correlation.points.len(), spec.num_layers * spec.num_heads);
        }
    }
}

#[test]
fn lm_head_mask_gradient_refuses_bad_inputs_by_name() {
    use layerwise::training::{Head, Network};
    let loaded = layerwise::load(&fixture_str("gpt2-sharded")).unwrap();
    let spec = loaded.model.spec().clone();
    let network =
        Network::new(&spec, Some(&layerwise::io::open_weights(&loaded.files.weights).unwrap()), 0, false).unwrap();
    let ones = HeadMask::ones(spec.num_layers, spec.num_heads);
    let err = |texts: &[Vec<u32>], mask: &HeadMask| {
        network.head_mask_gradient(texts, Head::Original, mask).unwrap_err().to_string()
    };
    assert!(err(&[], &ones).contains("no texts"));
    assert!(err(&[vec![3]], &ones).contains("text 0"));
    assert!(err(&[vec![3, 999]], &ones).contains("outside the vocabulary"));
    assert!(err(&[vec![3, 4]], &HeadMask::ones(2, 2)).contains("head mask"));
}
