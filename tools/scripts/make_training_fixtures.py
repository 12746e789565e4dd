#!/usr/bin/env python3
"""Record what PyTorch computes for training on the small fixtures: the multi-head loss, every
parameter's gradient, and the parameters after two AdamW steps with gradient clipping.

Environment: the one in make_fixtures.py's header (torch, transformers 4.48.2, autocontrastive-gen 0.2.0).
    ~/lw-venv/bin/python tools/scripts/make_training_fixtures.py [--fixtures tests/fixtures]

Per fixture (gpt2-sharded, gpt-neo-bin, llama-bf16) it writes `training.safetensors`:
    input_ids [2, 12] (int64)
    loss.original, loss.exit.<L> (scalars): next-token cross-entropy of each head, mean over tokens;
        the exit losses as upstream's MultiHeadGPT2/MultiHeadGPTNeo.forward(labels=...) computes them
        (their sum is checked against upstream's own loss), the original head's added to the total
    grad.<name>: d(total)/d(parameter) for every parameter, in the checkpoint's layout
    after.<name>: the parameters after two steps of torch.optim.AdamW(lr=1e-2, betas (0.9, 0.999),
        eps 1e-3, weight_decay 0.1 on 2-D tensors, 0 elsewhere) on the same batch, each step's
        gradient clipped by torch.nn.utils.clip_grad_norm_(max_norm=0.5)
    loss.step2 (scalar): the total loss before the second step
and gpt2-sharded's also holds the conversion-matrix fit:
    conv.input_ids [8, 16]; conv.<L> [d, d] for L = 1, 2: numpy.linalg.lstsq's C (y = C x) from
        ln_f(hidden_states[L]) to hidden_states[4] (the top, already normed) over those positions

With --roundtrip DIR (a checkpoint layerwise wrote) it instead loads DIR with upstream's
MultiHeadGPT2 once per exit head and writes DIR/roundtrip.safetensors: input_ids [T] and
exit.<L> / logits [T, vocab] as upstream and transformers compute them.
All in f32, the model in eval mode (no dropout), bf16 weights upcast exactly first.
"""
import argparse
import os
import sys

import numpy
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import add_exit_heads, exit_logits, load_exit_heads  # noqa: E402

from autocontrastive_gen.modeling.gpt2_multi_head import MultiHeadGPT2  # noqa: E402
from autocontrastive_gen.modeling.gpt_neo_multi_head import MultiHeadGPTNeo  # noqa: E402

# eps is large on purpose: GPT-2's key bias has an exactly-zero gradient (softmax ignores a constant
# score shift), so autograd's rounding noise there would otherwise become full +-lr Adam steps.
LR, WEIGHT_DECAY, MAX_NORM, EPS = 1e-2, 0.1, 0.5, 1e-3


def cross_entropy(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def losses(model, ids, upstream):
    """Each head's loss; with an upstream model, its summed exit loss is checked against ours."""
    out = model(ids, labels=ids if upstream else None, output_hidden_states=True, use_cache=False)
    final_norm = model.model.norm if isinstance(model, LlamaForCausalLM) else model.transformer.ln_f
    per_head = {"original": cross_entropy(model.lm_head(out.hidden_states[-1]), ids)}
    for layer in model.config.lm_head_layer_indices:
        per_head[f"exit.{layer}"] = cross_entropy(exit_logits(model, out.hidden_states, layer, final_norm), ids)
    if upstream:
        exits = sum(v for k, v in per_head.items() if k.startswith("exit."))
        torch.testing.assert_close(out.loss, exits, rtol=1e-6, atol=1e-6)
    return per_head


def load(fixture):
    name = os.path.basename(fixture)
    if name == "llama-bf16":
        model = LlamaForCausalLM.from_pretrained(fixture, torch_dtype=torch.float32)
        add_exit_heads(model, model.config.lm_head_layer_indices, 0)
        load_exit_heads(model, fixture)
        return model, False
    cls = MultiHeadGPTNeo if name == "gpt-neo-bin" else MultiHeadGPT2
    model = cls.from_pretrained(fixture, use_original_head=True, torch_dtype=torch.float32, freeze_parameters=False)
    return model, True


def record(fixture):
    model, upstream = load(fixture)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    tensors = {"input_ids": ids}

    per_head = losses(model, ids, upstream)
    total = sum(per_head.values())
    total.backward()
    for k, v in per_head.items():
        tensors[f"loss.{k}"] = v.detach().reshape(())
    for name, p in model.named_parameters():
        tensors[f"grad.{name}"] = p.grad.detach().clone()

    if os.path.basename(fixture) == "gpt2-sharded":
        conv_ids = torch.randint(0, model.config.vocab_size, (8, 16), generator=gen)
        tensors["conv.input_ids"] = conv_ids
        with torch.no_grad():
            hidden = model(conv_ids, output_hidden_states=True, use_cache=False).hidden_states
        top = hidden[-1].reshape(-1, hidden[-1].size(-1)).double().numpy()
        for layer in (1, 2):
            x = model.transformer.ln_f(hidden[layer]).detach().reshape(-1, top.shape[1]).double().numpy()
            solution = numpy.linalg.lstsq(x, top, rcond=None)[0]  # x @ solution = y, so C = solution^T
            tensors[f"conv.{layer}"] = torch.from_numpy(solution.T.copy()).float()

    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=EPS)
    for step in range(2):
        opt.zero_grad()
        total = sum(losses(model, ids, upstream).values())
        if step == 1:
            tensors["loss.step2"] = total.detach().reshape(())
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
    for name, p in model.named_parameters():
        tensors[f"after.{name}"] = p.detach().clone()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(fixture, "training.safetensors"))
    print(f"{fixture}: " + ", ".join(f"{k} {v.item():.5f}" for k, v in per_head.items()))


def roundtrip(out_dir, prompt_len=10):
    """Upstream's logits of every exit head (and the original head) of a layerwise-written checkpoint."""
    import json
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    ids = torch.arange(prompt_len)[None] * 7 % cfg["vocab_size"]
    tensors = {"input_ids": ids[0]}
    for layer in cfg["lm_head_layer_indices"]:
        model = MultiHeadGPT2.from_pretrained(out_dir, use_original_head=False, output_layer_index=layer,
                                              torch_dtype=torch.float32, freeze_parameters=False)
        with torch.no_grad():
            tensors[f"exit.{layer}"] = model(ids, output_hidden_states=True, use_cache=False).logits[0]
    model = MultiHeadGPT2.from_pretrained(out_dir, use_original_head=True, torch_dtype=torch.float32)
    with torch.no_grad():
        tensors["logits"] = model(ids, output_hidden_states=True, use_cache=False).logits[0]
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "roundtrip.safetensors"))
    print(f"{out_dir}: upstream loaded exits {cfg['lm_head_layer_indices']}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixtures", default="tests/fixtures")
    parser.add_argument("--roundtrip", metavar="DIR")
    args = parser.parse_args()
    if args.roundtrip:
        roundtrip(args.roundtrip)
        return
    torch.manual_seed(0)
    for name in ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"]:
        record(os.path.join(args.fixtures, name))


if __name__ == "__main__":
    main()
