"""The Python package against the fixtures transformers and upstream autocontrastive-gen recorded
(tests/fixtures/*/generation.json, expected.safetensors): generation under every plan and projection, the
forward pass, the step-by-step decoder, a Python contrast function, errors as exceptions, and upstream's
README example with the import changed."""
import json
import os
import struct

import numpy as np
import pytest

import layerwise
from layerwise import LayerwiseError, MultiExitConfiguration

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "fixtures")


def fixture(name):
    return os.path.join(FIXTURES, name)


def read_safetensors(path):
    """The tensors of a safetensors file as float64 numpy arrays (F32 and F64 entries)."""
    with open(path, "rb") as f:
        data = f.read()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    body = data[8 + size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = {"F32": np.float32, "F64": np.float64, "I64": np.int64}.get(info["dtype"])
        if dtype is not None:
            out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"]).astype(np.float64)
    return out


def config_of(case):
    projection = {"heads": "layer_heads", "lens": "logit_lens", "converted": "conversion_matrices"}[case["projection"]]
    if case["kind"] == "original":
        return MultiExitConfiguration(vocab_projection_mode=projection)
    if case["kind"] == "exit":
        return MultiExitConfiguration(use_original_head=False, output_layer_index=case["layer"],
                                      vocab_projection_mode=projection)
    return MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(case["upper"], case["lower"]),
                                  vocab_projection_mode=projection, alpha=case["alpha"],
                                  minimum_candidates=case["min_candidates"])


@pytest.mark.parametrize("name", ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"])
def test_generate_equals_transformers_and_upstream(name):
    recorded = json.load(open(os.path.join(fixture(name), "generation.json")))
    prompt = recorded["prompt"]
    for case in recorded["cases"]:
        model = layerwise.Model.from_pretrained(fixture(name), multi_exit_config=config_of(case))
        out = model.generate([prompt], max_new_tokens=recorded["max_new_tokens"], eos_token_id=case["eos_token_id"],
                             min_new_tokens=case.get("min_new_tokens", 0))
        assert out[0][:len(prompt)] == prompt
        assert out[0][len(prompt):] == case["ids"], f"{name} {case['name']}"


def test_a_batch_of_prompts_runs_through_the_scheduler():
    recorded = json.load(open(os.path.join(fixture("gpt2-sharded"), "generation.json")))
    prompt, case = recorded["prompt"], recorded["cases"][0]
    model = layerwise.Model.from_pretrained(fixture("gpt2-sharded"))
    # The recorded prompt between two others, as a left-padded 2-D array with its attention mask.
    batch = np.array([[0, 0] + prompt[2:], prompt, [0, 0, 0] + prompt[3:]])
    mask = np.array([[0, 0] + [1] * 10, [1] * 12, [0, 0, 0] + [1] * 9])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, eos_token_id=case["eos_token_id"])
    assert len(out) == 3 and out[0][:10] == prompt[2:] and out[2][:9] == prompt[3:]
    assert out[1][12:] == case["ids"]
    beams = model.generate([prompt], max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert len(beams) == 2 and all(b[:12] == prompt for b in beams)
    sampled = [model.generate([prompt], max_new_tokens=6, do_sample=True, top_k=20, seed=s)[0] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1], "a seed gives the same tokens"


def test_forward_equals_transformers():
    expected = read_safetensors(os.path.join(fixture("gpt2-sharded"), "expected.safetensors"))
    recorded = json.load(open(os.path.join(fixture("gpt2-sharded"), "generation.json")))
    model = layerwise.Model.from_pretrained(fixture("gpt2-sharded"))
    out = model([recorded["prompt"]], output_hidden_states=True)
    assert out.logits.shape == (1, 12, model.vocab_size)
    np.testing.assert_allclose(out.lm_logits[0], expected["logits"], atol=1e-4)
    for layer in model.exit_layers:
        np.testing.assert_allclose(out.exit_logits[layer][0], expected[f"exit.{layer}"], atol=1e-4)
    assert len(out.hidden_states) == model.num_layers + 1
    for i, state in enumerate(out.hidden_states):
        np.testing.assert_allclose(state[0], expected[f"hidden.{i}"], atol=1e-4)


def test_the_decoder_steps_forks_and_releases():
    recorded = json.load(open(os.path.join(fixture("gpt2-sharded"), "generation.json")))
    prompt, case = recorded["prompt"], recorded["cases"][0]
    model = layerwise.Model.from_pretrained(fixture("gpt2-sharded"))
    decoder = model.decoder(cache_tokens=128)
    seq = decoder.add_sequence(prompt)
    generated = []
    for _ in range(4):
        scores = decoder.step()[seq]
        token = int(np.argmax(scores))
        generated.append(token)
        decoder.append(seq, token)
    assert generated == case["ids"][:4]
    beam = decoder.fork(seq)
    assert decoder.tokens(beam) == prompt + generated
    decoder.release(beam)
    with pytest.raises(LayerwiseError, match="not active"):
        decoder.append(beam, 1)


def test_a_python_contrast_function_replaces_acd():
    recorded = json.load(open(os.path.join(fixture("gpt2-sharded"), "generation.json")))
    case = next(c for c in recorded["cases"] if c["name"] == "contrast.4.1")

    def acd(upper, lower, alpha=0.1):
        # upstream's calculate_contrasted_logits in numpy: log-softmax difference on the plausible tokens.
        def log_softmax(x):
            x = x - x.max()
            return x - np.log(np.exp(x).sum())
        up, lo = log_softmax(upper.astype(np.float64)), log_softmax(lower.astype(np.float64))
        plausible = up >= up.max() + np.log(alpha)
        return np.where(plausible, up - lo, -np.inf)

    config = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(4, 1), contrast_function=acd)
    model = layerwise.Model.from_pretrained(fixture("gpt2-sharded"), multi_exit_config=config)
    out = model.generate([recorded["prompt"]], max_new_tokens=12, eos_token_id=case["eos_token_id"])
    assert out[0][12:] == case["ids"]

    def broken(upper, lower):
        raise RuntimeError("the user's bug")

    config = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(4, 1), contrast_function=broken)
    model = layerwise.Model.from_pretrained(fixture("gpt2-sharded"), multi_exit_config=config)
    with pytest.raises(RuntimeError, match="the user's bug"):
        model.generate([recorded["prompt"]], max_new_tokens=3)


def test_streaming_and_text():
    model = layerwise.Model.from_pretrained(fixture("demo-gpt2-multiexit"))
    ids = model.tokenizer("The benefits of bad advice")["input_ids"]
    streamed = list(model.stream(ids, max_new_tokens=6))
    assert streamed == model.generate([ids], max_new_tokens=6)[0][len(ids):]
    assert model.generate_text("The benefits of bad advice", max_new_tokens=6) == model.tokenizer.decode(streamed)
    # Text in, prompt + new ids out, as for ids.
    assert model.generate("The benefits of bad advice", max_new_tokens=6) == [ids + streamed]
    two = model.generate(["The benefits of bad advice", "And God said"], max_new_tokens=3)
    assert len(two) == 2 and two[0] == ids + streamed[:3]


def test_errors_name_what_is_wrong():
    with pytest.raises(LayerwiseError, match="exit"):
        layerwise.Model.from_pretrained(
            fixture("gpt2-sharded"), multi_exit_config=MultiExitConfiguration(use_original_head=False, output_layer_index=3))
    with pytest.raises(LayerwiseError, match="no such model directory"):
        layerwise.Model.from_pretrained(os.path.join(FIXTURES, "no-such-model"))
    with pytest.raises(LayerwiseError, match="Contradiction"):
        MultiExitConfiguration(use_original_head=True, contrast_layer_indices=(4, 1))
    model = layerwise.Model.from_pretrained(fixture("gpt2-sharded"))
    with pytest.raises(LayerwiseError, match="max_length"):
        model.generate([[1, 2, 3]], max_length=20)
    with pytest.raises(LayerwiseError, match="top_p"):
        model.generate([[1, 2, 3]], do_sample=True, top_p=1.5)
    with pytest.raises(LayerwiseError, match="vocabulary"):
        model.generate([[1, 2, 100000]], max_new_tokens=2)


def test_upstream_readme_example_ported_by_the_import():
    # upstream autocontrastive-gen's README, with `from autocontrastive_gen...` replaced by `layerwise` and its
    # hub model by the fixture; the ids are those upstream generated (generation.json, contrast.original.1).
    from layerwise import Model as AutoMultiExitModel
    recorded = json.load(open(os.path.join(fixture("gpt2-sharded"), "generation.json")))
    case = next(c for c in recorded["cases"] if c["name"] == "contrast.original.1")
    multi_exit_config = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 1))
    model = AutoMultiExitModel.from_pretrained(fixture("gpt2-sharded"), multi_exit_config=multi_exit_config)
    prompt = np.array([recorded["prompt"]])
    generated_ids = model.generate(prompt, max_new_tokens=12, eos_token_id=case["eos_token_id"], pad_token_id=0)
    assert generated_ids[0][prompt.shape[1]:] == case["ids"]


def test_ctrl_c_interrupts_a_long_generation():
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import layerwise\n"
        f"model = layerwise.Model.from_pretrained({fixture('demo-gpt2-multiexit')!r})\n"
        "print('ready', flush=True)\n"
        "model.generate([[5, 17, 42]] * 64, max_new_tokens=60, min_new_tokens=60, batch_size=64)\n"
        "model.generate([[5, 17, 42]] * 64, max_new_tokens=60, min_new_tokens=60, batch_size=64)\n"
        "print('finished', flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    start = time.monotonic()
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=30)
    assert "finished" not in out, "the generation ran to its end despite Ctrl-C"
    assert "KeyboardInterrupt" in err, err
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("name", ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"])
def test_lens_activations_and_attention_equal_transformers(name):
    recorded = read_safetensors(os.path.join(FIXTURES, "inspect", f"{name}.safetensors"))
    lens_json = json.load(open(os.path.join(FIXTURES, "inspect", "lens.json")))
    prompt = lens_json["prompt"]
    model = layerwise.Model.from_pretrained(fixture(name))
    points = [key[len("act."):] for key in recorded if key.startswith("act.")]
    activations = model.activations(prompt, points)
    for point in points:
        np.testing.assert_allclose(activations[point], recorded[f"act.{point}"], atol=2e-4, err_msg=point)
    attentions = model.attentions(prompt)
    for block in range(model.num_layers):
        np.testing.assert_allclose(attentions[block], recorded[f"attn.{block}"], atol=1e-5, err_msg=f"block {block}")
    lens = model.logit_lens(prompt, top_k=lens_json["top_k"])
    np.testing.assert_allclose(np.array(lens["entropy"]), recorded["lens.final.entropy"], atol=2e-4)
    assert np.array(lens["top_ids"]).tolist() == recorded["lens.final.top_ids"].astype(int).tolist()
    with pytest.raises(LayerwiseError, match="point"):
        model.activations(prompt, ["h.99"])


def test_harness_scoring_equals_lm_eval_recorded():
    """The primitives under the lm-eval model, against lm-eval's HFLM numbers recorded on the demo checkpoint
    (tests/fixtures/evaluation/lm-eval.json; make_eval_fixtures.py): loglikelihood of (context, target) pairs,
    split as TemplateLM._encode_pair splits them, and loglikelihood_rolling of whole texts (the third is longer
    than the 64-token context). The harness itself is tested in test_harness.py."""
    recorded = json.load(open(os.path.join(FIXTURES, "evaluation", "lm-eval.json")))
    model = layerwise.Model.from_pretrained(fixture("demo-gpt2-multiexit"), dtype="f32")
    native, tokenizer = model._native, model.tokenizer
    pairs = []
    for row in recorded["rows"]:
        whole = tokenizer.encode(row["context"] + row["target"], add_special_tokens=False)
        context = tokenizer.encode(row["context"], add_special_tokens=False)
        pairs.append((context, whole[len(context):]))
    scores = native.loglikelihood(pairs)
    rolling = native.loglikelihood_rolling([tokenizer.encode(r["text"], add_special_tokens=False)
                                            for r in recorded["rows"]], native.bos_token_id)
    for row, (loglikelihood, greedy), whole in zip(recorded["rows"], scores, rolling):
        assert loglikelihood == pytest.approx(row["loglikelihood"], rel=1e-5)
        assert greedy == row["is_greedy"]
        assert whole == pytest.approx(row["rolling_loglikelihood"], rel=1e-5)
    with pytest.raises(LayerwiseError, match="max_length 65"):
        native.loglikelihood(pairs[:1], 65)
    with pytest.raises(LayerwiseError, match="pair 0"):
        native.loglikelihood([([], [1])])


def test_a_true_answer_of_on_tokens_stops_that_prompt():
    model = layerwise.Model.from_pretrained(fixture("demo-gpt2-multiexit"))
    prompts = [model.tokenizer.encode("And God said"), model.tokenizer.encode("In the beginning")]
    config = json.dumps({"max_new_tokens": 8, "eos_token_id": [], "do_sample": False})
    full = model._native.generate(prompts, config, 2)
    seen = {0: [], 1: []}

    def on_tokens(index, ids):
        seen[index].extend(ids)
        return index == 0 and len(seen[0]) >= 3

    stopped = model._native.generate(prompts, config, 2, on_tokens)
    assert stopped[0] == ([full[0][0][0][:3]], "stopped")
    assert stopped[1] == full[1] and full[1][1] == "length"


def test_eight_bit_weights_score_close_to_f32():
    """dtype="q8" (GGUF's Q8_0 blocks, as the CLI's --dtype q8) on the trained demo: every continuation's
    log-likelihood moves by little and none is exactly f32's; a dtype that is none of them names the choices."""
    recorded = json.load(open(os.path.join(FIXTURES, "evaluation", "lm-eval.json")))
    exact = layerwise.Model.from_pretrained(fixture("demo-gpt2-multiexit"), dtype="f32")
    eight = layerwise.Model.from_pretrained(fixture("demo-gpt2-multiexit"), dtype="q8")
    tokenizer = exact.tokenizer
    pairs = []
    for row in recorded["rows"]:
        whole = tokenizer.encode(row["context"] + row["target"], add_special_tokens=False)
        context = tokenizer.encode(row["context"], add_special_tokens=False)
        pairs.append((context, whole[len(context):]))
    a, b = exact._native.loglikelihood(pairs), eight._native.loglikelihood(pairs)
    for (la, _), (lb, _) in zip(a, b):
        assert lb == pytest.approx(la, rel=2e-2, abs=5e-2)
    assert any(la != lb for (la, _), (lb, _) in zip(a, b))
    with pytest.raises(LayerwiseError, match="q8"):
        layerwise.Model.from_pretrained(fixture("demo-gpt2-multiexit"), dtype="q9")
