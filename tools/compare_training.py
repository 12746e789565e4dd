#!/usr/bin/env python3
"""Training throughput, layerwise against PyTorch, on one machine in one run: the same config, batch
and block, random weights and tokens, forward + backward + clipping + AdamW; rounds alternate the two
and the medians are reported with their ratio and layerwise's fraction of the machine's gemm ceiling.

    ~/lw-venv/bin/python tools/compare_training.py --config tools/demo/config.json [--rounds 3]

PyTorch runs transformers' GPT2LMHeadModel (eval mode: no dropout, as layerwise) with the exit heads of
`lm_head_layer_indices` as upstream attaches them, the loss the LM head's plus each exit's, on
torch.get_num_threads() threads (both cores here) in f32.
"""
import argparse
import json
import statistics
import subprocess
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def torch_step_seconds(config_path, batch, block, steps):
    cfg = json.load(open(config_path))
    config = GPT2Config(**{k: v for k, v in cfg.items() if k != "lm_head_layer_indices"})
    model = GPT2LMHeadModel(config).eval()
    exits = cfg.get("lm_head_layer_indices", [])
    heads = torch.nn.ModuleList([torch.nn.Linear(config.n_embd, config.vocab_size, bias=False) for _ in exits])
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, block))

    def step():
        opt.zero_grad()
        out = model(ids, labels=ids, output_hidden_states=True)
        loss = out.loss
        for layer, head in zip(exits, heads):
            logits = head(model.transformer.ln_f(out.hidden_states[layer]))
            loss = loss + torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def layerwise_run(binary, config_path, batch, block, steps):
    out = subprocess.run([binary, "bench-train", "--config", config_path, "--batch-size", str(batch),
                          "--block-size", str(block), "--steps", str(steps), "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--binary", default="target/release/layerwise")
    a = p.parse_args()
    tokens = a.batch * a.block
    torch_s, lw = [], []
    for _ in range(a.rounds):
        lw.append(layerwise_run(a.binary, a.config, a.batch, a.block, a.steps))
        torch_s.append(torch_step_seconds(a.config, a.batch, a.block, a.steps))
    lw_s = statistics.median(r["step_seconds"] for r in lw)
    t_s = statistics.median(torch_s)
    ceiling = statistics.median(r["gemm_ceiling_gflops"] for r in lw)
    fraction = statistics.median(r["fraction_of_ceiling"] for r in lw)
    print(json.dumps({
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "layerwise_tokens_per_second": tokens / lw_s, "torch_tokens_per_second": tokens / t_s,
        "speedup_vs_torch": t_s / lw_s, "gemm_ceiling_gflops": ceiling, "layerwise_fraction_of_ceiling": fraction,
    }, indent=1))


if __name__ == "__main__":
    main()
