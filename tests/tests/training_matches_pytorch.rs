//! Training (issue #14, `layerwise::training`) against PyTorch on the three fixture architectures
//! (GPT-2 with a top-layer exit, GPT-Neo with local attention, Llama with grouped-query attention
//! and an untied head): the trainable network's logits equal transformers', each head's loss and
//! every parameter's gradient equal autograd's (tools/scripts/make_training_fixtures.py; upstream's
//! multi-head loss for GPT-2 and GPT-Neo), and two AdamW steps with clipping land where
//! `torch.optim.AdamW` does.

use std::collections::HashMap;

use layerwise::training::optimizer::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use layerwise::training::{Batch, Head, Network};
use layerwise::{io, DType, ModelFiles, ModelSpec};
use layerwise_tests::{assert_close, expected, expected_ids, fixture, read_safetensors, Recorded};

const FIXTURES: [&str; 3] = ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"];

fn network(name: &str) -> Network {
    let files = ModelFiles::from_dir(&fixture(name)).expect("files");
    let spec = ModelSpec::from_file(&files.config).expect("config");
    let weights = io::open_weights(&files.weights).expect("weights");
    Network::new(&spec, Some(&weights), 0, false).expect("network")
}

fn recorded_batch(rec: &HashMap<String, Recorded>) -> Batch {
    let ids = &rec["input_ids"];
    Batch { tokens: ids.values.iter().map(|&v| v as u32).collect(), batch: ids.shape[0], time: ids.shape[1] }
}

fn heads(net: &Network) -> Vec<Head> {
    std::iter::once(Head::Original).chain(net.exit_layers().into_iter().map(Head::Exit)).collect()
}

fn key(head: Head) -> String {
    match head {
        Head::Original => "loss.original".into(),
        Head::Exit(l) => format!("loss.exit.{l}"),
    }
}

#[test]
fn the_trainable_network_computes_the_transformers_logits() {
    for name in FIXTURES {
        let net = network(name);
        let rec = expected(name);
        let ids = expected_ids(&rec);
        let batch = Batch { time: ids.len(), tokens: ids, batch: 1 };
        assert_close(
            &format!("{name} logits"),
            &net.logits(&batch, Head::Original).expect("logits"),
            &rec["logits"],
            1e-5,
        );
        for layer in net.exit_layers() {
            let got = net.logits(&batch, Head::Exit(layer)).expect("exit logits");
            assert_close(&format!("{name} exit {layer}"), &got, &rec[&format!("exit.{layer}")], 1e-5);
        }
    }
}

#[test]
fn losses_and_gradients_equal_pytorch_autograd() {
    for name in FIXTURES {
        let net = network(name);
        let rec = read_safetensors(&fixture(name).join("training.safetensors"));
        let mut grads = vec![0.0; net.params.values.len()];
        let losses = net.forward_backward(&recorded_batch(&rec), &heads(&net), Some(&mut grads)).expect("backward");
        for (head, loss) in &losses.per_head {
            let want = rec[&key(*head)].values[0];
            assert!((loss - want).abs() <= 1e-5 * want.abs(), "{name} {head}: loss {loss} vs PyTorch {want}");
        }
        let mut compared = 0;
        // Conversion matrices ride along frozen: autograd has no gradient for them either.
        let trainable = net.params.to_tensors(&grads, DType::F32).into_iter().zip(&net.params.params);
        for (param, tensor) in trainable.filter(|(_, p)| p.trainable).map(|(t, _)| t) {
            let want =
                rec.get(&format!("grad.{param}")).unwrap_or_else(|| panic!("{name}: PyTorch has no parameter {param}"));
            assert_eq!(tensor.shape(), want.shape.as_slice(), "{name} {param}");
            assert_close(&format!("{name} grad {param}"), &tensor.data().to_f32_vec(), want, 2e-5);
            compared += 1;
        }
        // Every parameter autograd saw was compared (the tied LM head is the token embedding).
        assert_eq!(compared, rec.keys().filter(|k| k.starts_with("grad.")).count(), "{name}");
    }
}

#[test]
fn two_adamw_steps_with_clipping_land_where_torch_does() {
    for name in FIXTURES {
        let mut net = network(name);
        let rec = read_safetensors(&fixture(name).join("training.safetensors"));
        let batch = recorded_batch(&rec);
        let heads = heads(&net);
        let config = AdamWConfig {
            learning_rate: 1e-2,
            weight_decay: 0.1,
            max_grad_norm: 0.5,
            eps: 1e-3,
            schedule: Schedule::Constant,
            ..Default::default()
        };
        let mut adam = AdamW::new(config.clone(), net.params.values.len());
        for step in 0..2 {
            let mut grads = vec![0.0; net.params.values.len()];
            let losses = net.forward_backward(&batch, &heads, Some(&mut grads)).expect("backward");
            if step == 1 {
                let want = rec["loss.step2"].values[0];
                assert!(
                    (losses.total() - want).abs() <= 1e-5 * want,
                    "{name}: step 2 loss {} vs {want}",
                    losses.total()
                );
            }
            clip_grad_norm(&mut grads, config.max_grad_norm);
            adam.update(&mut net.params, &grads, config.learning_rate_at(step, 2));
        }
        let trainable = net.params.to_tensors(&net.params.values, DType::F32).into_iter().zip(&net.params.params);
        for (param, tensor) in trainable.filter(|(_, p)| p.trainable).map(|(t, _)| t) {
            assert_close(
                &format!("{name} {param} after 2 steps"),
                &tensor.data().to_f32_vec(),
                &rec[&format!("after.{param}")],
                1e-5,
            );
        }
    }
}

#[test]
fn conversion_matrices_equal_numpy_least_squares() {
    let mut net = network("gpt2-sharded");
    let rec = read_safetensors(&fixture("gpt2-sharded").join("training.safetensors"));
    let ids = &rec["conv.input_ids"];
    let batch =
        Batch { tokens: ids.values.iter().map(|&v| v as u32).collect(), batch: ids.shape[0], time: ids.shape[1] };
    let residuals =
        layerwise::training::conversions::fit_conversions(&mut net, std::iter::once(batch), &[1, 2]).expect("fit");
    for (layer, residual) in residuals {
        assert!((0.0..1.0).contains(&residual), "layer {layer}: residual fraction {residual}");
        let id = net.params.id(&format!("name_to_conv_matrix.{layer}_to_4.weight")).expect("fitted");
        assert_close(&format!("conversion {layer}"), net.params.get(id), &rec[&format!("conv.{layer}")], 1e-4);
    }
}
