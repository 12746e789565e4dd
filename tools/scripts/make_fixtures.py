#!/usr/bin/env python3
"""Make the small random checkpoints under tests/fixtures/ and record what transformers (and upstream
autocontrastive-gen) compute on them.

Reference environment (outside the repo):
    python3 -m venv ~/lw-venv
    ~/lw-venv/bin/pip install torch transformers==4.48.2 safetensors numpy
    ~/lw-venv/bin/pip install --no-deps autocontrastive-gen==0.2.0
    ~/lw-venv/bin/python tools/scripts/make_fixtures.py [--out tests/fixtures] [--tokenizer ../shared/fixtures/gpt2-tokenizer]

Each checkpoint directory gets an `expected.safetensors` with
    input_ids [T] (int64), logits [T, vocab], exit.<L> [T, vocab] for every exit head,
    hidden.<i> [T, hidden] for i = 0..=num_layers (transformers' output_hidden_states convention),
all f32, computed in f32 from the stored weights (bf16/f16 checkpoints are upcast exactly first).
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, GPT2TokenizerFast, GPTNeoConfig,
                          GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM)

try:
    from autocontrastive_gen.modeling.gpt2_multi_head import MultiHeadGPT2
    from autocontrastive_gen.modeling.gpt_neo_multi_head import MultiHeadGPTNeo
except ImportError:  # the exit heads can still be written by hand; upstream is the cross-check
    MultiHeadGPT2 = MultiHeadGPTNeo = None

SEED = 1234
# Far from the 0.02 default, so that logits are spread out and argmaxes are never near-ties.
INIT_STD = 0.3


def randomize(model, seed):
    """Fills every parameter with N(0, INIT_STD); norm weights with 1 + N(0, 0.2) so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(INIT_STD * noise)


def exit_logits(model, hidden_states, layer, final_norm):
    """Upstream's exit: block L's output through the final norm, then the head; the top layer's
    hidden state already had the final norm."""
    n = model.config.num_hidden_layers
    h = hidden_states[layer]
    if layer != n:
        h = final_norm(h)
    return model.name_to_lm_exit_head[f"lm_head_{layer}"](h)


def add_conversions(model, layers, seed):
    """Attach upstream-format conversion matrices name_to_conv_matrix.{L}_to_{N} (hidden -> hidden)."""
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    model.name_to_conv_matrix = torch.nn.ModuleDict(
        {f"{l}_to_{n}": torch.nn.Linear(d, d, bias=False) for l in layers if l != n})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in model.name_to_conv_matrix.values():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / d ** 0.5 + torch.eye(d))


def add_exit_heads(model, layers, seed):
    """Attach upstream-format exit heads (nn.Linear(hidden, vocab, bias=False)) to any causal LM."""
    model.config.lm_head_layer_indices = list(layers)
    model.name_to_lm_exit_head = torch.nn.ModuleDict(
        {f"lm_head_{l}": torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
         for l in layers})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.name_to_lm_exit_head.values():
            head.weight.copy_(INIT_STD * torch.randn(head.weight.shape, generator=gen))


def record(model, final_norm, input_ids, out_dir):
    model.eval()
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        tensors = {"input_ids": ids[0].to(torch.int64).contiguous()}
        hidden = out.hidden_states
        tensors["logits"] = model.lm_head(hidden[-1])[0].float().contiguous()
        for i, h in enumerate(hidden):
            tensors[f"hidden.{i}"] = h[0].float().contiguous()
        for layer in model.config.lm_head_layer_indices:
            tensors[f"exit.{layer}"] = exit_logits(model, hidden, layer, final_norm)[0].float().contiguous()
    save_file(tensors, os.path.join(out_dir, "expected.safetensors"))
    return tensors


def check_against_upstream(upstream_cls, out_dir, tensors):
    """Loads the saved checkpoint with upstream autocontrastive-gen and checks every exit it computes."""
    if upstream_cls is None:
        print("  (autocontrastive-gen not installed: upstream cross-check skipped)")
        return
    ids = tensors["input_ids"][None]
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    for layer in cfg["lm_head_layer_indices"]:
        model = upstream_cls.from_pretrained(out_dir, use_original_head=False, output_layer_index=layer,
                                             torch_dtype=torch.float32, freeze_parameters=False)
        model.config.output_hidden_states = True
        with torch.no_grad():
            logits = model(ids, output_hidden_states=True, use_cache=False).logits[0]
        torch.testing.assert_close(logits, tensors[f"exit.{layer}"], rtol=0, atol=1e-5)
    print("  upstream autocontrastive-gen agrees on every exit head")


def reload_f32(cls, out_dir):
    """The saved checkpoint as transformers loads it, upcast to f32 (the engine computes in f32)."""
    return cls.from_pretrained(out_dir, torch_dtype=torch.float32)


def make_gpt2(out_dir, tokenizer_dir=None, *, vocab, hidden, layers, heads, exits, dtype, shard, prompt_ids,
              seed, conversions=()):
    os.makedirs(out_dir, exist_ok=True)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=layers, n_head=heads,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    config.lm_head_layer_indices = list(exits)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    randomize(model, seed)
    add_exit_heads(model, exits, seed + 1)
    if conversions:
        add_conversions(model, conversions, seed + 2)
    model.to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=shard or "10GB")
    if tokenizer_dir:
        for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    ref = reload_f32(GPT2LMHeadModel, out_dir)
    add_exit_heads(ref, exits, 0)
    load_exit_heads(ref, out_dir)
    tensors = record(ref, ref.transformer.ln_f, prompt_ids, out_dir)
    check_against_upstream(MultiHeadGPT2, out_dir, tensors)
    return ref


def load_exit_heads(model, out_dir):
    """Copies the saved exit-head (and conversion) tensors, upcast to f32, into a reloaded model."""
    from safetensors import safe_open
    import glob
    files = glob.glob(os.path.join(out_dir, "*.safetensors"))
    files = [f for f in files if not f.endswith("expected.safetensors")]
    found = {}
    if files:
        for f in files:
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    if k.startswith("name_to_lm_exit_head.") or k.startswith("name_to_conv_matrix."):
                        found[k] = st.get_tensor(k)
    else:
        state = torch.load(os.path.join(out_dir, "pytorch_model.bin"), weights_only=True)
        found = {k: v for k, v in state.items() if k.startswith("name_to_lm_exit_head.")}
    convs = {k: v for k, v in found.items() if k.startswith("name_to_conv_matrix.")}
    if convs:
        add_conversions(model, [int(k.split(".")[1].split("_")[0]) for k in convs], 0)
    with torch.no_grad():
        for k, v in found.items():
            group, name = k.split(".")[:2]
            getattr(model, group)[name].weight.copy_(v.float())
    assert len(found) - len(convs) == len(model.config.lm_head_layer_indices), (found.keys(), out_dir)


def make_gpt_neo(out_dir, *, prompt_ids, seed):
    os.makedirs(out_dir, exist_ok=True)
    config = GPTNeoConfig(vocab_size=96, max_position_embeddings=64, hidden_size=32, num_layers=4, num_heads=4,
                          attention_types=[[["global", "local"], 2]], window_size=4, bos_token_id=95,
                          eos_token_id=95)
    exits = [2, 4]
    config.lm_head_layer_indices = exits
    model = GPTNeoForCausalLM(config)
    randomize(model, seed)
    add_exit_heads(model, exits, seed + 1)
    model.save_pretrained(out_dir, safe_serialization=False)  # a pytorch_model.bin archive
    ref = reload_f32(GPTNeoForCausalLM, out_dir)
    add_exit_heads(ref, exits, 0)
    load_exit_heads(ref, out_dir)
    tensors = record(ref, ref.transformer.ln_f, prompt_ids, out_dir)
    check_against_upstream(MultiHeadGPTNeo, out_dir, tensors)
    return ref


def make_llama(out_dir, *, prompt_ids, seed):
    os.makedirs(out_dir, exist_ok=True)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2)
    exits = [1, 3, 4]
    config.lm_head_layer_indices = exits
    model = LlamaForCausalLM(config)
    randomize(model, seed)
    add_exit_heads(model, exits, seed + 1)
    model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    ref = reload_f32(LlamaForCausalLM, out_dir)
    add_exit_heads(ref, exits, 0)
    load_exit_heads(ref, out_dir)
    record(ref, ref.model.norm, prompt_ids, out_dir)
    return ref


# ---------------------------------------------------------------------------------------------------
# Generation under exit plans.
#
# The reference for GPT-2 and GPT-Neo is upstream autocontrastive-gen's own model classes driven by
# transformers' generate() (greedy, with its KV cache). Llama has no upstream class, and upstream 0.2.0
# has no lens / conversion projections, so those cases use `plan_scores` below: upstream's formulas
# (its calculate_contrasted_logits, its exit definition) on a full recompute of the sequence at every
# step. Where both exist, the script checks that they agree.

def plan_scores(model, final_norm, ids, case):
    """Last-position scores of a plan, recomputed from scratch: logits, or contrasted log-probs."""
    from autocontrastive_gen.contrast_calculation import calculate_contrasted_logits
    n = model.config.num_hidden_layers
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states

        def project(source):
            if source == "original":
                return out.logits[0, -1]
            h = hidden[source][0, -1]
            if source != n:
                h = final_norm(h)
            if case["projection"] == "heads":
                return model.name_to_lm_exit_head[f"lm_head_{source}"](h)
            if case["projection"] == "converted" and source != n:
                h = model.name_to_conv_matrix[f"{source}_to_{n}"](h)
            return model.lm_head(h)

        if case["kind"] == "original":
            return out.logits[0, -1]
        if case["kind"] == "exit":
            return project(case["layer"])
        upper = project(case["upper"])
        lower = project(case["lower"])
        return calculate_contrasted_logits(upper[None, None], lower[None, None],
                                           minimum_candidates=case["min_candidates"], alpha=case["alpha"])[0, 0]


def greedy_by_recompute(model, final_norm, prompt, case, max_new_tokens, eos, min_new_tokens=0):
    ids = list(prompt)
    new = []
    while len(new) < max_new_tokens:
        scores = plan_scores(model, final_norm, ids, case).clone()
        if len(new) < min_new_tokens:
            scores[eos] = -float("inf")
        token = int(torch.argmax(scores))
        new.append(token)
        ids.append(token)
        if token in eos:
            break
    return new


def upstream_generate(out_dir, prompt, case, max_new_tokens, eos, min_new_tokens=0):
    """transformers generate() through upstream's AutoMultiExitModel (gpt2 / gpt_neo, exit heads only)."""
    from autocontrastive_gen.modeling.auto_model import AutoMultiExitModel
    from autocontrastive_gen.modeling.configuration import MultiExitConfiguration
    from autocontrastive_gen.contrast_calculation import calculate_contrasted_logits
    kwargs = {"use_original_head": case["kind"] == "original"}
    if case["kind"] == "exit":
        kwargs["output_layer_index"] = case["layer"]
    if case["kind"] == "contrast":
        kwargs["contrast_layer_indices"] = (case["upper"], case["lower"])
        a, k = case["alpha"], case["min_candidates"]
        kwargs["contrast_function"] = lambda u, l: calculate_contrasted_logits(u, l, minimum_candidates=k, alpha=a)
    model = AutoMultiExitModel.from_pretrained(out_dir, multi_exit_config=MultiExitConfiguration(**kwargs),
                                               torch_dtype=torch.float32)
    model.eval()
    # Upstream 0.2.0's GPT-Neo forward predates the `cache_position` argument that transformers 4.48's
    # generate() passes; GPT-Neo recomputes it when absent, so it is dropped here.
    forward = model.forward
    model.forward = lambda *a, cache_position=None, **kw: forward(*a, **kw)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0], min_new_tokens=min_new_tokens)
    return out[0, len(prompt):].tolist()


def record_generation(out_dir, model, final_norm, prompt, *, exits, upstream, conversions=(), max_new_tokens=12):
    n = model.config.num_hidden_layers
    eos = model.config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    low, mid = exits[0], exits[len(exits) // 2 - 1] if len(exits) > 2 else exits[0]
    top = n if n in exits else exits[-1]
    acd = {"alpha": 0.1, "min_candidates": 1}
    cases = [
        {"name": "original", "kind": "original", "projection": "heads"},
        {"name": f"exit.{low}", "kind": "exit", "layer": low, "projection": "heads"},
        {"name": f"contrast.{top}.{low}", "kind": "contrast", "upper": top, "lower": low, "projection": "heads", **acd},
        {"name": f"contrast.original.{low}", "kind": "contrast", "upper": "original", "lower": low,
         "projection": "heads", **acd},
        {"name": f"contrast.{top}.{mid}.alpha0.3.k3", "kind": "contrast", "upper": top, "lower": mid,
         "projection": "heads", "alpha": 0.3, "min_candidates": 3},
        {"name": "lens.exit.2", "kind": "exit", "layer": 2, "projection": "lens"},
        {"name": f"lens.contrast.original.1", "kind": "contrast", "upper": "original", "lower": 1,
         "projection": "lens", **acd},
    ]
    for layer in conversions:
        cases.append({"name": f"converted.contrast.{n}.{layer}", "kind": "contrast", "upper": n, "lower": layer,
                      "projection": "converted", **acd})
    scores = {}
    for case in cases:
        case["eos_token_id"] = eos
        case["ids"] = greedy_by_recompute(model, final_norm, prompt, case, max_new_tokens, eos)
        if upstream and case["projection"] == "heads":
            reference = upstream_generate(out_dir, prompt, case, max_new_tokens, eos)
            assert reference == case["ids"], (case["name"], reference, case["ids"])
            case["reference"] = "transformers generate() + upstream autocontrastive-gen"
        else:
            case["reference"] = "upstream formulas, full recompute per step"
        scores[case["name"]] = plan_scores(model, final_norm, prompt, case).float().contiguous()

    # min_new_tokens: make the 3rd greedy token the EOS, then forbid EOS for the first 5 tokens.
    base = cases[0]["ids"]
    stop = [base[2]]
    for min_new in (0, 5):
        case = {"name": f"original.eos{stop[0]}.min{min_new}", "kind": "original", "projection": "heads",
                "eos_token_id": stop, "min_new_tokens": min_new}
        case["ids"] = greedy_by_recompute(model, final_norm, prompt, case, max_new_tokens, stop, min_new)
        if upstream:
            reference = upstream_generate(out_dir, prompt, case, max_new_tokens, stop, min_new)
            assert reference == case["ids"], (case["name"], reference, case["ids"])
            case["reference"] = "transformers generate() + upstream autocontrastive-gen"
        else:
            case["reference"] = "upstream formulas, full recompute per step"
        cases.append(case)
    save_file(scores, os.path.join(out_dir, "generation.safetensors"))
    json.dump({"prompt": list(prompt), "max_new_tokens": max_new_tokens, "cases": cases},
              open(os.path.join(out_dir, "generation.json"), "w"), indent=1)
    print(f"  recorded {len(cases)} greedy generations")


def record_warpers(out_dir):
    """transformers' processed scores for temperature / top-k / top-p on fixed random logits."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 96, generator=gen) * 3
    settings = [(1.0, 50, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 10, 0.8), (1.0, 0, 0.5)]
    tensors = {"logits": logits[0].contiguous()}
    for i, (t, k, p) in enumerate(settings):
        scores = logits.clone()
        if t != 1.0:
            scores = TemperatureLogitsWarper(t)(None, scores)
        if k > 0:
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1.0:
            scores = TopPLogitsWarper(p)(None, scores)
        tensors[f"warped.{i}"] = scores[0].contiguous()
    save_file(tensors, os.path.join(out_dir, "warpers.safetensors"))
    json.dump({"settings": [{"temperature": t, "top_k": k, "top_p": p} for t, k, p in settings]},
              open(os.path.join(out_dir, "warpers.json"), "w"), indent=1)


def record_tokenizer(tokenizer_dir, out_dir):
    """Copies tokenizer.json and records transformers' ids and decodes for a set of awkward texts."""
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), out_dir)
    fast = GPT2TokenizerFast.from_pretrained(tokenizer_dir)
    slow = GPT2Tokenizer.from_pretrained(tokenizer_dir)
    texts = [
        "The benefits of bad advice",
        " leading space and  two spaces",
        "Hello, world! It's 2023... isn't it?",
        "tabs\tand\nnewlines\n\n  indented",
        "naïve café, Ελληνικά, 日本語, emoji 🤖🚀",
        "<|endoftext|>special in the middle<|endoftext|>",
        "numbers 1234567890 and symbols #$%^&*()[]{}",
        "",
    ]
    cases = []
    for text in texts:
        ids = fast(text)["input_ids"]
        assert ids == slow(text)["input_ids"], text
        cases.append({"text": text, "ids": ids, "decoded": fast.decode(ids)})
    json.dump({"cases": cases}, open(os.path.join(out_dir, "expected.json"), "w"), ensure_ascii=False, indent=1)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(root, "tests", "fixtures"))
    parser.add_argument("--tokenizer", default=os.path.join(root, "..", "shared", "fixtures", "gpt2-tokenizer"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    prompt = [5, 17, 42, 3, 88, 61, 17, 9, 0, 73, 26, 50]  # 12 tokens: longer than GPT-Neo's window of 4

    print("gpt2-sharded: GPT-2, f32, sharded safetensors, exits [1, 2, 4]")
    out = os.path.join(args.out, "gpt2-sharded")
    model = make_gpt2(out, vocab=96, hidden=32, layers=4, heads=4, exits=[1, 2, 4], dtype=torch.float32,
                      shard="100KB", prompt_ids=prompt, seed=SEED, conversions=[1, 2])
    record_generation(out, model, model.transformer.ln_f, prompt, exits=[1, 2, 4], upstream=True, conversions=[1, 2])
    record_warpers(out)
    print("gpt-neo-bin: GPT-Neo, f32, pytorch_model.bin, local window 4, exits [2, 4]")
    out = os.path.join(args.out, "gpt-neo-bin")
    model = make_gpt_neo(out, prompt_ids=prompt, seed=SEED + 10)
    record_generation(out, model, model.transformer.ln_f, prompt, exits=[2, 4], upstream=True)
    print("llama-bf16: Llama, bf16 safetensors, GQA 4 heads / 2 kv heads, exits [1, 3, 4]")
    out = os.path.join(args.out, "llama-bf16")
    model = make_llama(out, prompt_ids=prompt, seed=SEED + 20)
    record_generation(out, model, model.model.norm, prompt, exits=[1, 3, 4], upstream=False)

    print("gpt2-tokenizer: tokenizer.json and transformers' ids")
    record_tokenizer(args.tokenizer, os.path.join(args.out, "gpt2-tokenizer"))

    print("demo-gpt2-multiexit: GPT-2 with the real vocabulary, f16, exits [2, 4] (random weights)")
    demo_prompt = GPT2TokenizerFast.from_pretrained(args.tokenizer)("The benefits of bad advice")["input_ids"]
    make_gpt2(os.path.join(args.out, "demo-gpt2-multiexit"), tokenizer_dir=args.tokenizer, vocab=50257,
              hidden=32, layers=4, heads=4, exits=[2, 4], dtype=torch.float16, shard=None,
              prompt_ids=demo_prompt, seed=SEED + 30)


if __name__ == "__main__":
    main()
