#!/usr/bin/env python3
"""`layerwise classify` against transformers 4.48's BertForSequenceClassification, in one run on one machine.

The checkpoint: a randomly initialised BERT of bert-base's shape (12 layers, 12 heads, hidden 768, 6 labels
as the emotion classifier has), seeded, saved as safetensors with the fixtures' WordPiece vocabulary
(tests/fixtures/bert/vocab.txt; the config keeps bert-base's 30522 rows). The dataset: --rows texts of
4-60 words (seeded). transformers classifies it as a pipeline would: batches of --batch-size in file
order, padded to the batch's longest text, eager attention, torch threads = this machine's cores.
layerwise runs `layerwise classify --batch-size N --json` (each text unpadded). Classification time only:
transformers' model is loaded before the clock starts; layerwise's load and tokenisation are taken out by
timing a run over one text and subtracting it. Also checks that both sides give the same labels and the
same probabilities (max abs difference).

    python tools/compare_bert.py [--rows 256] [--batch-size 32] [--repeats 3] [--out FILE]

Needs torch, transformers==4.48.2 and safetensors.
"""
import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VOCAB = os.path.join(ROOT, "tests", "fixtures", "bert", "vocab.txt")
LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def make_checkpoint(directory):
    torch.manual_seed(0)
    config = BertConfig(num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                        label2id={l: i for i, l in enumerate(LABELS)}, attn_implementation="eager")
    BertForSequenceClassification(config).eval().save_pretrained(directory, safe_serialization=True)
    shutil.copy(VOCAB, os.path.join(directory, "vocab.txt"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}, f)


def make_dataset(path, rows, seed=0):
    words = [w for w in open(VOCAB).read().split() if w.isalpha() and not w.startswith("[")]
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 60))) for _ in range(rows)]
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def layerwise(binary, model, texts_file, batch_size):
    started = time.perf_counter()
    out = subprocess.run([binary, "classify", "--model", model, "--texts", texts_file, "--batch-size",
                          str(batch_size), "--json"], check=True, capture_output=True, text=True)
    return time.perf_counter() - started, json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "layerwise"))
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "bert-base-random")
        make_checkpoint(model)
        texts_file, one_file = os.path.join(tmp, "texts.jsonl"), os.path.join(tmp, "one.jsonl")
        texts = make_dataset(texts_file, args.rows)
        make_dataset(one_file, 1)
        tok = BertTokenizerFast.from_pretrained(model)
        hf = BertForSequenceClassification.from_pretrained(model, attn_implementation="eager").eval()
        tokens = sum(len(tok(t)["input_ids"]) for t in texts)

        def transformers_run():
            probs = []
            started = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(texts), args.batch_size):
                    enc = tok(texts[i:i + args.batch_size], padding=True, truncation=True, return_tensors="pt")
                    probs.extend(hf(**enc).logits.softmax(-1).tolist())
            return time.perf_counter() - started, probs

        hf_times, lw_times = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine
            seconds, hf_probs = transformers_run()
            hf_times.append(seconds)
            whole, verdicts = layerwise(args.binary, model, texts_file, args.batch_size)
            fixed, _ = layerwise(args.binary, model, one_file, args.batch_size)
            lw_times.append(whole - fixed)
        diff = max(abs(a - b) for v, p in zip(verdicts, hf_probs) for a, b in zip(v["probs"], p))
        same = sum(v["label"] == LABELS[max(range(len(p)), key=p.__getitem__)] for v, p in zip(verdicts, hf_probs))
        hf_s, lw_s = statistics.median(hf_times), statistics.median(lw_times)
        report = {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "rows": args.rows, "tokens": tokens, "batch_size": args.batch_size,
            "transformers_texts_per_s": args.rows / hf_s, "layerwise_texts_per_s": args.rows / lw_s,
            "speedup": hf_s / lw_s, "same_labels": f"{same}/{args.rows}", "max_abs_prob_difference": diff,
            "transformers_seconds": hf_times, "layerwise_seconds": lw_times,
        }
        print(json.dumps(report, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
