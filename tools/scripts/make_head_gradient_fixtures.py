"""Records transformers 4.48's head-mask gradients of causal LMs (Michel et al. 2019 head importance
with the language-modeling loss) and the bertology exercise's attention entropy per head.

For each checkpoint (`gpt2-sharded`, `gpt-neo-bin`: GPT-Neo's local layers included) and TEXTS (token
ids of different lengths, ONE right-padded batch with `attention_mask`, `labels` -100 at the padding),
writes to tests/fixtures/head-gradients/expected.safetensors under `{name}.`:
- `loss`, `grad`: the loss and `head_mask.grad` with a mask of ones; `masked.loss`, `masked.grad`:
  with head 2 of layer 1 at 0,
- `importance`: |grad| / real tokens, each layer divided by its L2 norm (+1e-20),
- `entropy`: each head's attention entropy summed over the real query positions of every text,
  divided by the real tokens (bertology's `attn_entropy / tot_tokens`, with 0 log 0 = 0),
- `correlation`: Pearson's coefficient of entropy and importance over all heads.

    python tools/scripts/make_head_gradient_fixtures.py   # needs torch, transformers==4.48.2, safetensors
"""
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "fixtures")
OUT = os.path.join(FIXTURES, "head-gradients")
TEXTS = [[5, 17, 42, 3, 88, 61, 7, 19, 33, 2], [9, 0, 73, 26, 50], [11, 12, 13, 14, 15, 16, 17]]


def padded():
    width = max(map(len, TEXTS))
    ids = torch.zeros(len(TEXTS), width, dtype=torch.long)
    mask = torch.zeros(len(TEXTS), width, dtype=torch.long)
    for i, t in enumerate(TEXTS):
        ids[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def importance(grad, tokens):
    imp = grad.abs() / tokens
    return imp / (imp.pow(2).sum(-1).pow(0.5).unsqueeze(-1) + 1e-20)


def entropy(attentions, mask):
    """bertology's compute_heads_importance: entropy per (layer, head), summed over real queries."""
    rows = []
    for attn in attentions:  # [batch, heads, q, k]
        plogp = attn * torch.log(attn)
        plogp[attn == 0] = 0
        e = -plogp.sum(-1)  # [batch, heads, q]
        rows.append((e * mask.unsqueeze(1).float()).sum(-1).sum(0))
    return torch.stack(rows) / mask.float().sum()


def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())


def main():
    os.makedirs(OUT, exist_ok=True)
    out = {}
    ids, mask, labels = padded()
    tokens = mask.float().sum()
    for name in ["gpt2-sharded", "gpt-neo-bin"]:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, name), attn_implementation="eager").eval()
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        for key, zero in [("", None), ("masked.", (1, 2))]:
            head_mask = torch.ones(layers, heads)
            if zero is not None:
                head_mask[zero] = 0.0
            head_mask.requires_grad_(True)
            result = model(input_ids=ids, attention_mask=mask, labels=labels, head_mask=head_mask,
                           output_attentions=True)
            result.loss.backward()
            out[f"{name}.{key}loss"] = result.loss.detach().double().reshape(1)
            out[f"{name}.{key}grad"] = head_mask.grad.contiguous()
            if zero is None:
                imp = importance(head_mask.grad, tokens)
                ent = entropy([a.detach() for a in result.attentions], mask)
                out[f"{name}.importance"] = imp.contiguous()
                out[f"{name}.entropy"] = ent.contiguous()
                out[f"{name}.correlation"] = pearson(ent, imp).reshape(1)
                print(name, "loss", result.loss.item(), "correlation", out[f"{name}.correlation"].item())
    save_file(out, os.path.join(OUT, "expected.safetensors"))


if __name__ == "__main__":
    main()
