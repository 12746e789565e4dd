#!/usr/bin/env python3
"""Record what lm-evaluation-harness itself computes on the demo fixture (random weights, GPT-2's
tokenizer, a 64-token context), and a Parquet dataset, for the evaluation tests.

Environment: make_fixtures.py's virtualenv plus `pip install lm-eval==0.4.8 "datasets<3.3"` (then
`pip install transformers==4.48.2` again: lm-eval's install upgrades it).
    ~/lw-venv/bin/python tools/scripts/make_eval_fixtures.py [--model DIR --name NAME]

Writes tests/fixtures/evaluation/:
    lm-eval.json (or NAME.json with --model): for each text, lambada_openai's context and target (doc_to_text / doc_to_target),
        HFLM.loglikelihood's (loglikelihood, is_greedy) of that pair, and HFLM.loglikelihood_rolling
        of the whole text, on tests/fixtures/demo-gpt2-multiexit in f32
    texts.parquet: columns `text` (strings) and `n` (integers), snappy-compressed as datasets writes
"""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

TEXTS = [
    "And God said, Let there be light: and there was light.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures",
    # Longer than the 64-token context: lm-eval cuts the context from the left.
    " ".join(["In the beginning was the Word, and the Word was with God, and the Word was God."] * 6) + " Amen",
    "Blessed are the meek: for they shall inherit the earth",
    # Targets the trained demo predicts greedily (the greedy flag is then tested both ways).
    "In the beginning God created the heaven and the earth",
    "And the LORD spake unto Moses, saying",
    "And God said, Let there be light: and there was light",
]


def main():
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tests/fixtures/demo-gpt2-multiexit")
    parser.add_argument("--name", default="lm-eval")
    args = parser.parse_args()
    out = "tests/fixtures/evaluation"
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    lm = HFLM(pretrained=args.model, device="cpu", dtype="float32", batch_size=1)
    rows = []
    for text in TEXTS:
        context = " ".join(text.split(" ")[:-1])
        target = " " + text.split(" ")[-1]
        (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (context, target), 0)])
        (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        rows.append({"text": text, "context": context, "target": target, "loglikelihood": ll,
                     "is_greedy": bool(greedy), "rolling_loglikelihood": rolling})
    with open(os.path.join(out, f"{args.name}.json"), "w") as f:
        json.dump({"model": args.model, "rows": rows}, f, indent=1)
    table = pa.table({"text": ["first document", "second document"], "n": [1, 2]})
    pq.write_table(table, os.path.join(out, "texts.parquet"), compression="snappy")
    print(json.dumps(rows, indent=1)[:800])


if __name__ == "__main__":
    main()
