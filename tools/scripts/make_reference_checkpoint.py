#!/usr/bin/env python3
"""Write a random-weight checkpoint shaped like ibm/gpt2-medium-multiexit (GPT-2, 24 layers, hidden 1024,
16 heads, vocab 50257, exit heads at layers 2, 4, ..., 24 in upstream autocontrastive-gen's format).

Used for loading, memory and throughput measurements (README, tools/compare_transformers.py). The
weights are random: only shapes and byte counts matter. Needs numpy, torch and safetensors. The config is
written by hand (the fields transformers' GPT2Config writes that matter), so any transformers version, or
none, will do.

    python tools/scripts/make_reference_checkpoint.py --out /tmp/gpt2-medium-multiexit-random [--dtype f32|f16|bf16]

`--agreeing-exit L` makes speculation's best case for measuring its speed (`layerwise bench --speculate L`):
the blocks above layer L add nothing to the residual stream (their output projections are zero, every
other weight random and read as usual) and the exit head of L is the LM head, so the exit's prediction is
the model's, and every draft is accepted.
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file


LAYERS, HIDDEN, HEADS, VOCAB, POSITIONS = 24, 1024, 16, 50257, 1024
EXITS = list(range(2, LAYERS + 1, 2))


def tensors(rng, dtype, agreeing_exit=None):
    def normal(*shape, std=0.02):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * std).to(dtype)

    def ones(n):
        return torch.ones(n, dtype=dtype)

    def zeros(n):
        return torch.zeros(n, dtype=dtype)

    d = HIDDEN
    wte = normal(VOCAB, d)
    yield "transformer.wte.weight", wte
    yield "transformer.wpe.weight", normal(POSITIONS, d, std=0.01)
    for i in range(LAYERS):
        h = f"transformer.h.{i}"
        yield f"{h}.ln_1.weight", ones(d)
        yield f"{h}.ln_1.bias", zeros(d)
        yield f"{h}.attn.c_attn.weight", normal(d, 3 * d)
        yield f"{h}.attn.c_attn.bias", zeros(3 * d)
        silent = agreeing_exit is not None and i >= agreeing_exit
        yield f"{h}.attn.c_proj.weight", torch.zeros(d, d, dtype=dtype) if silent else normal(d, d)
        yield f"{h}.attn.c_proj.bias", zeros(d)
        yield f"{h}.ln_2.weight", ones(d)
        yield f"{h}.ln_2.bias", zeros(d)
        yield f"{h}.mlp.c_fc.weight", normal(d, 4 * d)
        yield f"{h}.mlp.c_fc.bias", zeros(4 * d)
        yield f"{h}.mlp.c_proj.weight", torch.zeros(4 * d, d, dtype=dtype) if silent else normal(4 * d, d)
        yield f"{h}.mlp.c_proj.bias", zeros(d)
    yield "transformer.ln_f.weight", ones(d)
    yield "transformer.ln_f.bias", zeros(d)
    for layer in EXITS:
        head = wte.clone() if layer == agreeing_exit else normal(VOCAB, d)
        yield f"name_to_lm_exit_head.lm_head_{layer}.weight", head


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    parser.add_argument("--agreeing-exit", type=int, choices=EXITS, help="the exit every draft of which is accepted")
    args = parser.parse_args()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB, "n_positions": POSITIONS,
        "n_ctx": POSITIONS, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": True, "torch_dtype": str(dtype).replace("torch.", ""), "lm_head_layer_indices": EXITS,
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    rng = np.random.default_rng(0)
    weights = dict(tensors(rng, dtype, args.agreeing_exit))
    save_file(weights, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
