//! BERT against transformers 4.48 (tools/scripts/make_bert_fixtures.py): the WordPiece tokenizer
//! (from `vocab.txt` and from `tokenizer.json`; pairs, token types, truncation), hidden states,
//! attention probabilities and classifier logits of one batch of inputs of different lengths
//! (transformers ran them padded, with `attention_mask`), on the CPU and reference backends, and the
//! classifier's labels and accuracy on the toy dataset.

use std::collections::HashMap;

use layerwise::encoder::{EncoderInput, EncoderRequest, LoadedEncoder};
use layerwise::{Backend, HeadMask};
use layerwise_tests::{assert_close, fixture, read_safetensors, Recorded};

fn recorded() -> HashMap<String, Recorded> {
    read_safetensors(&fixture("bert").join("expected.safetensors"))
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("bert").join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn checkpoint(name: &str) -> String {
    fixture("bert").join(name).to_string_lossy().into_owned()
}

/// The fixture's texts (`[first, second or null]`) through the checkpoint's tokenizer.
fn encode_texts<B: Backend>(loaded: &LoadedEncoder<B>) -> Vec<EncoderInput> {
    meta()["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|pair| loaded.encode(pair[0].as_str().expect("text"), pair[1].as_str()).expect("encodes"))
        .collect()
}

fn as_ids(r: &Recorded) -> Vec<u32> {
    r.values.iter().map(|&v| v as u32).collect()
}

#[test]
fn wordpiece_tokenizers_equal_transformers_on_texts_pairs_and_truncation() {
    let expected = recorded();
    // bert-random has only vocab.txt + tokenizer_config.json; bert-classifier only tokenizer.json.
    for (name, prefix) in [("bert-random", "random."), ("bert-classifier", "classifier.")] {
        let loaded = layerwise::encoder::load(&checkpoint(name)).expect("loads");
        let inputs = encode_texts(&loaded);
        assert_eq!(inputs.len(), 6);
        for (i, input) in inputs.iter().enumerate() {
            assert_eq!(input.ids, as_ids(&expected[&format!("{prefix}ids.{i}")]), "{name}: ids of text {i}");
            assert_eq!(input.types, as_ids(&expected[&format!("{prefix}types.{i}")]), "{name}: types of text {i}");
        }
        // The long pair was truncated to the model's 40 positions, and has both token types.
        assert_eq!(inputs[4].ids.len(), 40);
        assert!(inputs[4].types.contains(&1));
    }
}

fn check_forward<B: Backend>(loaded: &LoadedEncoder<B>, prefix: &str, tolerance: f64) {
    let expected = recorded();
    let inputs = encode_texts(loaded);
    let has_classifier = !loaded.encoder.labels().is_empty();
    let request = EncoderRequest { hidden_states: true, attentions: true, logits: has_classifier, head_mask: None };
    let outputs = loaded.encoder.forward(&inputs, &request).expect("forward");
    let spec = loaded.encoder.spec();
    for (i, out) in outputs.iter().enumerate() {
        let what = format!("{prefix}text {i} on {}", loaded.encoder.backend().name());
        assert_eq!(out.hidden_states.len(), spec.num_layers + 1);
        assert_close(
            &format!("{what} hidden states"),
            &out.hidden_states.concat(),
            &expected[&format!("{prefix}hidden.{i}")],
            tolerance,
        );
        assert_eq!(out.attentions.len(), spec.num_layers);
        assert_close(
            &format!("{what} attentions"),
            &out.attentions.concat(),
            &expected[&format!("{prefix}attn.{i}")],
            tolerance,
        );
    }
    if has_classifier {
        let logits: Vec<f32> = outputs.iter().flat_map(|o| o.logits.clone().expect("logits")).collect();
        assert_close(&format!("{prefix}logits"), &logits, &expected[&format!("{prefix}logits")], tolerance);
    }
}

#[test]
fn hidden_states_attentions_and_logits_equal_transformers_padded_batch() {
    for (name, prefix) in [("bert-random", "random."), ("bert-classifier", "classifier.")] {
        check_forward(&layerwise::encoder::load(&checkpoint(name)).expect("loads"), prefix, 1e-5);
        let reference = layerwise::encoder::load_on(&checkpoint(name), layerwise::Reference::default()).expect("loads");
        check_forward(&reference, prefix, 1e-5);
    }
}

#[test]
fn each_input_alone_equals_the_batch() {
    let loaded = layerwise::encoder::load(&checkpoint("bert-classifier")).expect("loads");
    let inputs = encode_texts(&loaded);
    let request = EncoderRequest { hidden_states: true, logits: true, ..Default::default() };
    let batch = loaded.encoder.forward(&inputs, &request).expect("batch");
    for (input, together) in inputs.iter().zip(&batch) {
        let alone = loaded.encoder.forward(std::slice::from_ref(input), &request).expect("alone");
        let (a, b) = (alone[0].logits.as_ref().unwrap(), together.logits.as_ref().unwrap());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5, "logits alone {a:?} vs in the batch {b:?}");
        }
    }
}

#[test]
fn classifier_labels_and_accuracy_equal_transformers_on_the_dataset() {
    let loaded = layerwise::encoder::load(&checkpoint("bert-classifier")).expect("loads");
    assert_eq!(loaded.encoder.labels(), ["sadness", "joy", "anger"]);
    let rows = std::fs::read_to_string(fixture("bert").join("emotions.jsonl")).expect("dataset");
    let rows: Vec<serde_json::Value> = rows.lines().map(|l| serde_json::from_str(l).expect("a row")).collect();
    let inputs: Vec<EncoderInput> =
        rows.iter().map(|r| loaded.encode(r["text"].as_str().expect("text"), None).expect("encodes")).collect();
    let verdicts = loaded.encoder.classify(&inputs).expect("classifies");
    let meta = meta();
    let predicted: Vec<&str> = verdicts.iter().map(|v| v.label.as_str()).collect();
    let want: Vec<&str> =
        meta["emotions"]["predicted"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(predicted, want);
    let probs: Vec<f32> = verdicts.iter().flat_map(|v| v.probs.clone()).collect();
    assert_close("probabilities", &probs, &recorded()["classifier.emotions.probs"], 1e-5);
    let correct = verdicts.iter().zip(&rows).filter(|(v, r)| r["label"] == v.label.as_str()).count();
    let accuracy = correct as f64 / rows.len() as f64;
    assert_eq!(accuracy, meta["emotions"]["accuracy"].as_f64().unwrap());
}

#[test]
fn a_head_mask_of_ones_changes_nothing_and_zeros_silence_a_head() {
    let loaded = layerwise::encoder::load(&checkpoint("bert-classifier")).expect("loads");
    let inputs = encode_texts(&loaded);
    let spec = loaded.encoder.spec();
    let plain = EncoderRequest { attentions: true, logits: true, ..Default::default() };
    let ones = EncoderRequest { head_mask: Some(HeadMask::ones(spec.num_layers, spec.num_heads)), ..plain.clone() };
    let (a, b) = (loaded.encoder.forward(&inputs, &plain).unwrap(), loaded.encoder.forward(&inputs, &ones).unwrap());
    assert_eq!(a[0].logits, b[0].logits);
    let mut rows = vec![vec![1.0; spec.num_heads]; spec.num_layers];
    rows[1][2] = 0.0;
    let masked = EncoderRequest { head_mask: Some(HeadMask::from_rows(&rows).unwrap()), ..plain };
    let m = loaded.encoder.forward(&inputs, &masked).unwrap();
    let t = m[0].tokens;
    assert!(m[0].attentions[1][2 * t * t..3 * t * t].iter().all(|&p| p == 0.0), "the masked head's map is zero");
    assert_ne!(m[0].logits, a[0].logits, "masking a head changes the logits");
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let loaded = layerwise::encoder::load(&checkpoint("bert-random")).expect("loads");
    let encoder = &loaded.encoder;
    let spec = encoder.spec();
    let err = |inputs: &[EncoderInput]| encoder.forward(inputs, &EncoderRequest::default()).unwrap_err().to_string();
    assert!(err(&[]).contains("empty"));
    assert!(err(&[EncoderInput::from_ids(vec![])]).contains("no tokens"));
    assert!(err(&[EncoderInput::from_ids(vec![spec.vocab_size as u32])]).contains("outside the vocabulary"));
    assert!(err(&[EncoderInput { ids: vec![2, 3], types: vec![0, 2] }]).contains("token type 2"));
    assert!(err(&[EncoderInput { ids: vec![2, 3], types: vec![0] }]).contains("token types"));
    assert!(err(&[EncoderInput::from_ids(vec![2; spec.max_positions + 1])]).contains("positions"));
    // A bare encoder has no classifier; an encoder is no decoder.
    let classify = encoder.classify(&[EncoderInput::from_ids(vec![2, 3])]).unwrap_err().to_string();
    assert!(classify.contains("classification head"), "{classify}");
    let decoder = layerwise::load(&checkpoint("bert-random")).err().expect("refused").to_string();
    assert!(decoder.contains("encoder"), "{decoder}");
    let not_encoder = layerwise::encoder::load(&fixture("gpt2-sharded").to_string_lossy()).err().expect("refused");
    assert!(not_encoder.to_string().contains("not an encoder"), "{not_encoder}");
}

fn classifier_network() -> (layerwise::training::bert::ClassifierNetwork, LoadedEncoder<layerwise::Cpu>) {
    let loaded = layerwise::encoder::load(&checkpoint("bert-classifier")).expect("loads");
    let weights = layerwise::io::open_weights(&loaded.files.weights).expect("weights");
    let network = layerwise::training::bert::ClassifierNetwork::new(loaded.encoder.spec(), &weights).expect("builds");
    (network, loaded)
}

fn dataset<B: Backend>(loaded: &LoadedEncoder<B>) -> (Vec<EncoderInput>, Vec<usize>) {
    let rows = std::fs::read_to_string(fixture("bert").join("emotions.jsonl")).expect("dataset");
    let labels = loaded.encoder.labels().to_vec();
    rows.lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).expect("a row");
            let input = loaded.encode(row["text"].as_str().unwrap(), None).unwrap();
            (input, labels.iter().position(|l| l == row["label"].as_str().unwrap()).unwrap())
        })
        .unzip()
}

#[test]
fn head_mask_gradient_and_importance_equal_pytorch_autograd() {
    let (network, loaded) = classifier_network();
    let (inputs, labels) = dataset(&loaded);
    let spec = loaded.encoder.spec();
    let expected = recorded();
    let mut masked_rows = vec![vec![1.0; spec.num_heads]; spec.num_layers];
    masked_rows[1][2] = 0.0;
    for (name, mask) in [
        ("importance", HeadMask::ones(spec.num_layers, spec.num_heads)),
        ("importance_masked", HeadMask::from_rows(&masked_rows).unwrap()),
    ] {
        let got = network.head_mask_gradient(&inputs, &labels, &mask).expect("gradient");
        let loss = expected[&format!("classifier.{name}.loss")].values[0];
        assert!((got.loss - loss).abs() < 1e-5, "{name}: loss {} vs transformers' {loss}", got.loss);
        assert_close(
            &format!("{name} gradient"),
            &got.gradient.concat(),
            &expected[&format!("classifier.{name}.grad")],
            1e-4,
        );
        if name == "importance" {
            assert_close("importance", &got.importance().concat(), &expected["classifier.importance"], 1e-4);
            // The host network's logits are the inference encoder's.
            let verdicts =
                loaded.encoder.forward(&inputs, &EncoderRequest { logits: true, ..Default::default() }).unwrap();
            for (a, b) in got.logits.iter().zip(&verdicts) {
                for (x, y) in a.iter().zip(b.logits.as_ref().unwrap()) {
                    assert!((x - y).abs() < 1e-4, "logits {a:?} vs {:?}", b.logits);
                }
            }
        }
    }
}

#[test]
fn head_mask_gradient_matches_finite_differences() {
    let (network, loaded) = classifier_network();
    let (inputs, labels) = dataset(&loaded);
    let (inputs, labels) = (&inputs[..6], &labels[..6]);
    let spec = loaded.encoder.spec();
    let ones = vec![vec![1.0f32; spec.num_heads]; spec.num_layers];
    let grad = network.head_mask_gradient(inputs, labels, &HeadMask::from_rows(&ones).unwrap()).unwrap().gradient;
    let h = 1e-2f32;
    for (layer, head) in [(0, 0), (1, 3), (2, 1)] {
        let loss_at = |delta: f32| {
            let mut rows = ones.clone();
            rows[layer][head] += delta;
            network.head_mask_gradient(inputs, labels, &HeadMask::from_rows(&rows).unwrap()).unwrap().loss
        };
        let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
        let analytic = grad[layer][head] as f64;
        assert!(
            (numeric - analytic).abs() <= 1e-3 * numeric.abs().max(1e-2),
            "layer {layer} head {head}: {numeric} vs {analytic}"
        );
    }
}

#[test]
fn masking_search_equals_the_reference_run_with_transformers_autograd() {
    let (network, loaded) = classifier_network();
    let (inputs, labels) = dataset(&loaded);
    let expected = recorded();
    let search = layerwise::analysis::classifier_heads::mask_search(&network, &inputs, &labels, 0.05).expect("search");
    let curve: Vec<f64> = search.curve.iter().flat_map(|&(masked, accuracy)| [masked as f64, accuracy]).collect();
    assert_eq!(curve, expected["classifier.search.curve"].values, "curve (heads masked, accuracy)");
    let order: Vec<f64> = search.order.iter().flat_map(|&(l, h)| [l as f64, h as f64]).collect();
    assert_eq!(order, expected["classifier.search.order"].values, "order the heads were masked in");
    let mask: Vec<f64> = search.mask.rows().concat().iter().map(|&f| f as f64).collect();
    assert_eq!(mask, expected["classifier.search.mask"].values, "final mask");
    assert_eq!(search.base_accuracy, meta()["emotions"]["accuracy"].as_f64().map(|a| (a * 1e4).round() / 1e4).unwrap());
}

#[test]
fn pruned_classifier_has_transformers_parameter_counts_and_computes_the_masked_logits() {
    let loaded = layerwise::encoder::load(&checkpoint("bert-classifier")).expect("loads");
    let (inputs, _) = dataset(&loaded);
    let expected = recorded();
    let rows: Vec<f32> = expected["classifier.search.mask"].values.iter().map(|&v| v as f32).collect();
    let spec = loaded.encoder.spec();
    let mask = HeadMask::from_rows(&rows.chunks(spec.num_heads).map(<[f32]>::to_vec).collect::<Vec<_>>()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report =
        layerwise::analysis::heads::prune_checkpoint_files(spec, &loaded.files, &mask, dir.path()).expect("prunes");
    let counts = &expected["classifier.pruned.parameters"].values;
    assert_eq!([report.parameters_before as f64, report.parameters_after as f64], [counts[0], counts[1]]);

    let logits = |encoder: &layerwise::encoder::Encoder<layerwise::Cpu>, mask: Option<HeadMask>| -> Vec<f32> {
        let request = EncoderRequest { logits: true, head_mask: mask, ..Default::default() };
        encoder.forward(&inputs, &request).unwrap().into_iter().flat_map(|o| o.logits.unwrap()).collect()
    };
    // The masked model and the pruned checkpoint (reloaded, no mask) both give transformers' logits.
    assert_close(
        "masked logits",
        &logits(&loaded.encoder, Some(mask.clone())),
        &expected["classifier.masked.logits"],
        1e-5,
    );
    let pruned = layerwise::encoder::load(dir.path().to_str().unwrap()).expect("the pruned checkpoint loads");
    assert_eq!(pruned.encoder.spec().pruned_heads, report.pruned_heads);
    assert_close("pruned logits", &logits(&pruned.encoder, None), &expected["classifier.pruned.logits"], 1e-5);
    // The pruned model keeps its tokenizer and labels.
    assert_eq!(pruned.encode("i feel so happy", None).unwrap(), loaded.encode("i feel so happy", None).unwrap());
    assert_eq!(pruned.encoder.labels(), loaded.encoder.labels());
}

#[test]
fn classifier_attention_entropy_and_its_correlation_with_importance_equal_transformers() {
    let (network, loaded) = classifier_network();
    let (inputs, labels) = dataset(&loaded);
    let expected = recorded();
    let entropy = layerwise::analysis::classifier_heads::attention_entropy(&loaded.encoder, &inputs).unwrap();
    assert_close("entropy", &entropy.concat(), &expected["classifier.entropy"], 1e-5);
    let spec = loaded.encoder.spec();
    let importance = network
        .head_mask_gradient(&inputs, &labels, &HeadMask::ones(spec.num_layers, spec.num_heads))
        .unwrap()
        .importance();
    let correlation = layerwise::analysis::heads::entropy_importance(&entropy, &importance);
    let reference = expected["classifier.correlation"].values[0];
    assert!(
        (correlation.coefficient.unwrap() - reference).abs() < 1e-4,
        "{:?} vs {reference}",
        correlation.coefficient
    );
}
