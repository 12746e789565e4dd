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
              seed):
    os.makedirs(out_dir, exist_ok=True)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=layers, n_head=heads,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    config.lm_head_layer_indices = list(exits)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    randomize(model, seed)
    add_exit_heads(model, exits, seed + 1)
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


def load_exit_heads(model, out_dir):
    """Copies the saved exit-head tensors (upcast to f32) into a reloaded model."""
    from safetensors import safe_open
    import glob
    files = glob.glob(os.path.join(out_dir, "*.safetensors"))
    files = [f for f in files if not f.endswith("expected.safetensors")]
    found = {}
    if files:
        for f in files:
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    if k.startswith("name_to_lm_exit_head."):
                        found[k] = st.get_tensor(k)
    else:
        state = torch.load(os.path.join(out_dir, "pytorch_model.bin"), weights_only=True)
        found = {k: v for k, v in state.items() if k.startswith("name_to_lm_exit_head.")}
    with torch.no_grad():
        for k, v in found.items():
            layer = k.split(".")[1]
            model.name_to_lm_exit_head[layer].weight.copy_(v.float())
    assert len(found) == len(model.config.lm_head_layer_indices), (found.keys(), out_dir)


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
    make_gpt2(os.path.join(args.out, "gpt2-sharded"), vocab=96, hidden=32, layers=4, heads=4, exits=[1, 2, 4],
              dtype=torch.float32, shard="100KB", prompt_ids=prompt, seed=SEED)
    print("gpt-neo-bin: GPT-Neo, f32, pytorch_model.bin, local window 4, exits [2, 4]")
    make_gpt_neo(os.path.join(args.out, "gpt-neo-bin"), prompt_ids=prompt, seed=SEED + 10)
    print("llama-bf16: Llama, bf16 safetensors, GQA 4 heads / 2 kv heads, exits [1, 3, 4]")
    make_llama(os.path.join(args.out, "llama-bf16"), prompt_ids=prompt, seed=SEED + 20)

    print("gpt2-tokenizer: tokenizer.json and transformers' ids")
    record_tokenizer(args.tokenizer, os.path.join(args.out, "gpt2-tokenizer"))

    print("demo-gpt2-multiexit: GPT-2 with the real vocabulary, f16, exits [2, 4] (random weights)")
    demo_prompt = GPT2TokenizerFast.from_pretrained(args.tokenizer)("The benefits of bad advice")["input_ids"]
    make_gpt2(os.path.join(args.out, "demo-gpt2-multiexit"), tokenizer_dir=args.tokenizer, vocab=50257,
              hidden=32, layers=4, heads=4, exits=[2, 4], dtype=torch.float16, shard=None,
              prompt_ids=demo_prompt, seed=SEED + 30)


if __name__ == "__main__":
    main()
