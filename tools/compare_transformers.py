#!/usr/bin/env python3
"""layerwise against transformers 4.48 (+ upstream autocontrastive-gen), measured in one run on one machine.

Makes (once) a random-weight checkpoint shaped like ibm/gpt2-medium-multiexit (tools/scripts/
make_reference_checkpoint.py), then times the same workloads in both: a 32-token prompt and 64 new tokens,
greedy, EOS ignored, timed end to end (prefill + decode) as transformers' generate() is timed, after one
warm-up run each. Every measurement runs in its own process, so that its peak resident memory is its own.
Prints the ratio table of the README's performance section (and writes it as JSON with --out).

    python tools/compare_transformers.py [--checkpoint DIR] [--layerwise target/release/layerwise] [--out FILE]

Needs torch, transformers==4.48.2, safetensors, numpy and (with --no-deps) autocontrastive-gen==0.2.0.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROMPT_LEN, NEW_TOKENS = 32, 64


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# Decoding strategies timed on the original head (transformers' generate() arguments).
STRATEGIES = {
    "beam4": {"num_beams": 4},
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
    "dola_high": {"dola_layers": "high"},
}
LAYERWISE_STRATEGIES = {
    "beam4": ["--num-beams", "4"],
    "contrastive": ["--penalty-alpha", "0.6", "--top-k", "4"],
    "dola_high": ["--dola-layers", "high"],
}


def prompt_ids(batch, length, vocab=50257):
    return [[(i * 7919 + b * 104729 + 13) % vocab for i in range(length)] for b in range(batch)]


def worker(kind, checkpoint, batch):
    """One transformers measurement; prints a JSON line."""
    import torch
    torch.set_num_threads(2)
    if kind in ("acd", "exit12"):
        from autocontrastive_gen.modeling.auto_model import AutoMultiExitModel
        from autocontrastive_gen.modeling.configuration import MultiExitConfiguration
        config = (MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(24, 12)) if kind == "acd"
                  else MultiExitConfiguration(use_original_head=False, output_layer_index=12))
        model = AutoMultiExitModel.from_pretrained(checkpoint, multi_exit_config=config, torch_dtype=torch.float32)
    else:
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel.from_pretrained(checkpoint, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        if kind == "prefill":
            ids = torch.tensor(prompt_ids(1, 512))
            model(ids[:, :64])  # warm-up
            start = time.perf_counter()
            model(ids)
            seconds = time.perf_counter() - start
            print(json.dumps({"tok_per_s": 512 / seconds, "peak_rss_mb": peak_rss_mb()}))
            return
        ids = torch.tensor(prompt_ids(batch, PROMPT_LEN))
        mask = torch.ones_like(ids)
        kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=50256, **STRATEGIES.get(kind, {}))
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)
        seconds = time.perf_counter() - start
        sequences = getattr(out, "sequences", out)  # upstream sets output_hidden_states: a dict comes back
        assert sequences.shape[1] == PROMPT_LEN + NEW_TOKENS
        print(json.dumps({"tok_per_s": batch * NEW_TOKENS / seconds, "peak_rss_mb": peak_rss_mb()}))


def run_transformers(kind, checkpoint, batch=1):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--checkpoint", checkpoint, "--batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"transformers worker {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(runs):
    """Field by field median of several measurements (JSON objects); other fields from the first."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(run[key] for run in runs)
    return out


def run_layerwise(binary, checkpoint, *flags):
    cmd = [binary, "bench", "--model", checkpoint, "--json", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/layerwise-gpt2-medium-multiexit-random")
    parser.add_argument("--layerwise", default=os.path.join(ROOT, "target", "release", "layerwise"))
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every measurement; medians are reported")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.checkpoint, args.batch)

    if not os.path.exists(os.path.join(args.checkpoint, "model.safetensors")):
        subprocess.run([sys.executable, os.path.join(HERE, "scripts", "make_reference_checkpoint.py"),
                        "--out", args.checkpoint], check=True)
    if not os.path.exists(args.layerwise):
        sys.exit(f"{args.layerwise} not found: run `cargo build --release` first")
    ck, lw = args.checkpoint, args.layerwise
    common = ["--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS)]

    t_tasks = {
        "acd": lambda: run_transformers("acd", ck),
        "exit12": lambda: run_transformers("exit12", ck),
        "b1": lambda: run_transformers("original", ck, 1),
        "b16": lambda: run_transformers("original", ck, 16),
        "prefill": lambda: run_transformers("prefill", ck),
        **{kind: (lambda kind=kind: run_transformers(kind, ck)) for kind in STRATEGIES},
    }
    l_tasks = {
        "acd": lambda: run_layerwise(lw, ck, "--contrast", "24,12", *common),
        "acd_bf16": lambda: run_layerwise(lw, ck, "--contrast", "24,12", "--dtype", "bf16", *common),
        "exit12": lambda: run_layerwise(lw, ck, "--exit", "12", *common),
        "b1": lambda: run_layerwise(lw, ck, *common),
        "b1_f16": lambda: run_layerwise(lw, ck, "--dtype", "f16", *common),
        "b1_bf16": lambda: run_layerwise(lw, ck, "--dtype", "bf16", *common),
        "b16": lambda: run_layerwise(lw, ck, "--batch", "16", *common),
        "prefill": lambda: run_layerwise(lw, ck, "--prompt-len", "512", "--new-tokens", "1"),
        **{kind: (lambda flags=flags: run_layerwise(lw, ck, *flags, *common))
           for kind, flags in LAYERWISE_STRATEGIES.items()},
    }
    # Rounds of every measurement, transformers and layerwise interleaved, so that the shared machine's
    # slow and fast spells fall on both; each number is the median over the rounds.
    t_runs, l_runs = {k: [] for k in t_tasks}, {k: [] for k in l_tasks}
    for r in range(args.repeat):
        print(f"round {r + 1} of {args.repeat} ...", file=sys.stderr)
        for key in t_tasks:
            t_runs[key].append(t_tasks[key]())
        for key in l_tasks:
            l_runs[key].append(l_tasks[key]())
    t = {k: median_of(v) for k, v in t_runs.items()}
    l = {k: median_of(v) for k, v in l_runs.items()}
    e2e = "end_to_end_tok_per_s"
    rows = [
        ("ACD 24 vs 12, f32, batch 1 (tok/s)", "upstream", t["acd"]["tok_per_s"], l["acd"], e2e, 4.5),
        ("ACD 24 vs 12, bf16 weights, batch 1", "upstream f32", t["acd"]["tok_per_s"], l["acd_bf16"], e2e, 7.5),
        ("exit 12, f32, batch 1", "upstream", t["exit12"]["tok_per_s"], l["exit12"], e2e, 8.0),
        ("original head, f32, batch 1", "transformers", t["b1"]["tok_per_s"], l["b1"], e2e, 1.8),
        ("original head, f16 weights, batch 1", "transformers f32", t["b1"]["tok_per_s"], l["b1_f16"], e2e, 2.9),
        ("original head, bf16 weights, batch 1", "transformers f32", t["b1"]["tok_per_s"], l["b1_bf16"], e2e, 2.9),
        ("original head, f32, batch 16", "transformers", t["b16"]["tok_per_s"], l["b16"], e2e, 3.5),
        ("prefill of 512 tokens, f32 (tok/s)", "transformers", t["prefill"]["tok_per_s"], l["prefill"],
         "prefill_tok_per_s", 1.0),
        ("beam search, 4 beams, f32, batch 1", "transformers", t["beam4"]["tok_per_s"], l["beam4"], e2e, 4.0),
        ("contrastive search 0.6, k=4, f32", "transformers", t["contrastive"]["tok_per_s"], l["contrastive"], e2e,
         4.0),
        ("DoLa high, f32, batch 1", "transformers", t["dola_high"]["tok_per_s"], l["dola_high"], e2e, 2.0),
    ]
    lines = ["| workload | reference | reference tok/s | layerwise tok/s | ratio | goal | bandwidth bound reached |",
             "|---|---|---|---|---|---|---|"]
    results = []
    for name, ref_name, ref, ours, key, goal in rows:
        ratio = ours[key] / ref
        bw = f"{100 * ours['bandwidth_fraction']:.0f}% (decode)" if "prefill" not in name else "n/a"
        lines.append(f"| {name} | {ref_name} | {ref:.1f} | {ours[key]:.1f} | {ratio:.2f}x | {goal}x "
                     f"{'met' if ratio >= goal else 'NOT met'} | {bw} |")
        results.append({"workload": name, "reference": ref, "layerwise": ours[key], "ratio": ratio, "goal": goal})
    mem_ratio = l["acd"]["peak_rss_mb"] / t["acd"]["peak_rss_mb"]
    lines.append(f"| peak resident memory, ACD 24 vs 12 (MiB) | upstream | {t['acd']['peak_rss_mb']:.0f} | "
                 f"{l['acd']['peak_rss_mb']:.0f} | {mem_ratio:.2f}x | at most 0.45x "
                 f"{'met' if mem_ratio <= 0.45 else 'NOT met'} | |")
    results.append({"workload": "peak_rss_acd", "reference": t["acd"]["peak_rss_mb"],
                    "layerwise": l["acd"]["peak_rss_mb"], "ratio": mem_ratio, "goal": 0.45})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"measured read bandwidth {l['b1']['bandwidth_gb_s']:.1f} GB/s"
    print(f"\nMachine: {machine}. Prompt {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, greedy unless named; "
          f"medians of {args.repeat} rounds.\n")
    print("\n".join(lines))
    if args.out:
        json.dump({"machine": machine, "rows": results, "transformers": t, "layerwise": l},
                  open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
