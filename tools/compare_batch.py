#!/usr/bin/env python3
"""`layerwise run` against transformers 4.48's batched generate() on the same dataset, in one run on one machine.

The dataset: 256 rows of mixed prompt lengths (16-256 tokens, seeded) and mixed output lengths (16-64 new
tokens, a `max_new_tokens` column; EOS ends a row early on both sides), greedy, on the random gpt2-medium-shaped checkpoint of
tools/scripts/make_reference_checkpoint.py (with the GPT-2 tokenizer copied in). transformers runs it as
run_gen.py-style scripts do: rows in file order, batches of --batch-size, left padding, the batch generating
until its longest row is done (a stopping criterion ends each row at its own length, as layerwise does;
finished rows are padded). layerwise runs `layerwise run --batch-size N --max-new-tokens-column`:
continuous batching, each row leaving its slot when done. Generation time only (model loading excluded on
both sides). Also checks that both sides generated the same ids row by row, and measures layerwise's decode
rate at batch 16 as a fraction of the machine's arithmetic peak (`layerwise bench --batch 16`).

    python tools/compare_batch.py [--checkpoint DIR] [--rows 256] [--batch-size 16] [--out FILE]

Needs torch, transformers==4.48.2, safetensors and numpy.
"""
import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Words that are one GPT-2 token each (with their leading space): a prompt of n words is n tokens.
WORDS = [" the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " was", " with", " be",
         " by", " on", " not", " he", " this", " are", " or", " his", " from", " at", " which", " but", " have",
         " an", " had", " they", " you", " were", " their", " one", " all", " we", " can", " her", " has",
         " there", " been", " if", " more", " when", " will", " would", " who", " so", " no"]


def make_dataset(path, rows, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            n = rng.randint(16, 256)
            text = "".join(rng.choice(WORDS) for _ in range(n)).lstrip()
            f.write(json.dumps({"id": i, "text": text, "max_new_tokens": rng.randint(16, 64)}) + "\n")


def transformers_worker(checkpoint, data, batch_size, out):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel, StoppingCriteria, StoppingCriteriaList

    torch.set_grad_enabled(False)
    rows = [json.loads(line) for line in open(data)]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = GPT2LMHeadModel.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()

    class RowLengths(StoppingCriteria):
        """Each row is done once it has its own number of new tokens."""

        def __init__(self, start, lengths):
            self.start, self.lengths = start, torch.tensor(lengths)

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids.shape[1] - self.start) >= self.lengths

    results = {}
    start = time.perf_counter()
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        enc = tokenizer([r["text"] for r in batch], return_tensors="pt", padding=True)
        lengths = [r["max_new_tokens"] for r in batch]
        out_ids = model.generate(**enc, max_new_tokens=max(lengths), do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id,
                                 stopping_criteria=StoppingCriteriaList([RowLengths(enc.input_ids.shape[1], lengths)]))
        for r, ids, n in zip(batch, out_ids[:, enc.input_ids.shape[1]:].tolist(), lengths):
            ids = ids[:n]
            # A row that generated EOS ends there (the rest is padding), EOS included, as layerwise returns it.
            if tokenizer.eos_token_id in ids:
                ids = ids[:ids.index(tokenizer.eos_token_id) + 1]
            results[r["id"]] = ids
    seconds = time.perf_counter() - start
    json.dump({"seconds": seconds, "ids": results, "torch": torch.__version__,
               "threads": torch.get_num_threads()}, open(out, "w"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/layerwise-gpt2-medium-multiexit-random")
    parser.add_argument("--layerwise", default=os.path.join(ROOT, "target", "release", "layerwise"))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", default="/tmp/layerwise-compare-batch")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = os.path.join(args.work, "rows.jsonl")
    if args.worker:
        return transformers_worker(args.checkpoint, data, args.batch_size, os.path.join(args.work, "transformers.json"))

    if not os.path.exists(os.path.join(args.checkpoint, "model.safetensors")):
        subprocess.run([sys.executable, os.path.join(HERE, "scripts", "make_reference_checkpoint.py"),
                        "--out", args.checkpoint], check=True)
    if not os.path.exists(os.path.join(args.checkpoint, "tokenizer.json")):
        shutil.copy(os.path.join(ROOT, "tests", "fixtures", "gpt2-tokenizer", "tokenizer.json"), args.checkpoint)
    os.makedirs(args.work, exist_ok=True)
    make_dataset(data, args.rows)

    print("transformers ...", file=sys.stderr)
    subprocess.run([sys.executable, __file__, "--worker", "--checkpoint", args.checkpoint, "--work", args.work,
                    "--batch-size", str(args.batch_size)], check=True)
    t = json.load(open(os.path.join(args.work, "transformers.json")))

    print("layerwise run ...", file=sys.stderr)
    out_dir = os.path.join(args.work, "layerwise")
    cmd = [args.layerwise, "run", "--model", args.checkpoint, "--data", data, "--output-dir", out_dir,
           "--overwrite-output-dir", "--max-new-tokens-column", "max_new_tokens",
           "--batch-size", str(args.batch_size)]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    run = json.load(open(os.path.join(out_dir, "run.json")))
    l_ids = {}
    for line in open(os.path.join(out_dir, "generations.jsonl")):
        record = json.loads(line)
        l_ids[str(record["id"])] = record["generated_ids"]
    same = sum(1 for k, ids in t["ids"].items() if l_ids.get(str(k)) == ids)

    print("layerwise bench --batch 16 ...", file=sys.stderr)
    bench = subprocess.run([args.layerwise, "bench", "--model", args.checkpoint, "--batch", "16", "--prompt-len", "32",
                            "--new-tokens", "64", "--json"], capture_output=True, text=True, check=True)
    b = json.loads(bench.stdout.strip().splitlines()[-1])

    rows = args.rows
    new_tokens = sum(len(ids) for ids in t["ids"].values())
    t_rows_s, l_rows_s = rows / t["seconds"], rows / run["totals"]["seconds"]
    result = {
        "cpu": platform.processor() or platform.machine(),
        "torch": t["torch"], "torch_threads": t["threads"],
        "rows": rows, "batch_size": args.batch_size, "new_tokens": new_tokens,
        "transformers_seconds": t["seconds"], "layerwise_seconds": run["totals"]["seconds"],
        "transformers_rows_per_s": t_rows_s, "layerwise_rows_per_s": l_rows_s, "ratio": l_rows_s / t_rows_s,
        "transformers_new_tok_per_s": new_tokens / t["seconds"],
        "layerwise_new_tok_per_s": run["totals"]["new_tokens_per_s"],
        "rows_with_identical_ids": same,
        "bench_batch16": {k: b[k] for k in ["decode_tok_per_s", "decode_gflop_s", "fma_peak_gflop_s",
                                             "gemm_ceiling_gflop_s", "arithmetic_fraction", "bandwidth_fraction",
                                             "bandwidth_gb_s"]},
    }
    print(json.dumps(result, indent=2))
    print(f"\nrows/s: transformers {t_rows_s:.3f}, layerwise {l_rows_s:.3f}: {l_rows_s / t_rows_s:.2f}x "
          f"(goal 3x); identical ids on {same}/{rows} rows; batch-16 decode {b['decode_tok_per_s']:.1f} tok/s = "
          f"{100 * b['arithmetic_fraction']:.0f}% of the {max(b['fma_peak_gflop_s'], b['gemm_ceiling_gflop_s']):.0f} "
          f"GFLOP/s arithmetic peak", file=sys.stderr)
    if args.out:
        json.dump(result, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
