"""Checks that transformers 4.48 reloads a BERT checkpoint that `layerwise heads --prune` wrote and
that it computes what the original computes with those heads masked.

    python tools/scripts/check_pruned_bert.py ORIGINAL_DIR PRUNED_DIR DATASET.jsonl
"""
import json
import sys

import torch
from transformers import AutoTokenizer, BertForSequenceClassification


def main(original_dir, pruned_dir, dataset):
    texts = [json.loads(line)["text"] for line in open(dataset)]
    tok = AutoTokenizer.from_pretrained(original_dir)
    enc = tok(texts, padding=True, return_tensors="pt")
    original = BertForSequenceClassification.from_pretrained(original_dir, attn_implementation="eager").eval()
    pruned = BertForSequenceClassification.from_pretrained(pruned_dir, attn_implementation="eager").eval()
    config = pruned.config
    mask = torch.ones(config.num_hidden_layers, config.num_attention_heads)
    for layer, heads in config.pruned_heads.items():
        mask[int(layer), heads] = 0.0
    with torch.no_grad():
        masked = original(**enc, head_mask=mask).logits
        got = pruned(**enc).logits
    count = sum(p.numel() for p in pruned.parameters())
    error = (masked - got).abs().max().item()
    print(f"pruned heads {config.pruned_heads}; {count} parameters; max |masked - pruned| logits {error:.2e}")
    assert error < 1e-5, error


if __name__ == "__main__":
    main(*sys.argv[1:])
