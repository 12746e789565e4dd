#!/usr/bin/env bash
# The demo checkpoint models/kjv-gpt2-multiexit, made with layerwise alone from Debian's King James
# Bible packages: a byte-level BPE of 4096 tokens, a 6-layer GPT-2 (d=256) with exit heads on layers
# 2 and 4 trained alongside, conversion matrices for both exits, held-out evaluations. Two stages:
# 3 epochs with the LM head tied to the embedding (tools/demo/config.json), then 3 more with it
# untied (config-untied.json; the head starts as the embedding) at a lower rate. About 1.5 hours on
# 2 cores. Usage: tools/scripts/train_demo.sh [WORK_DIR (default target/demo)]
set -euo pipefail
work=${1:-target/demo}
out=models/kjv-gpt2-multiexit
cargo build --release --bin layerwise
lw=target/release/layerwise

python3 tools/scripts/demo_data.py --out "$work/data"
$lw tokenizer train --data "$work/data/train.jsonl" --vocab-size 4096 --out "$work/config"
cp tools/demo/config.json "$work/config/"
$lw train --config "$work/config" --data "$work/data/train.jsonl" --eval-data "$work/data/held-out.jsonl" \
    --out "$work/run" --epochs 3 --save-every 100 --eval-every 100 --save-dtype f16 --log-every 10 \
    2>&1 | tee "$work/train.log"
$lw train --config tools/demo/config-untied.json --tokenizer "$work/config" --init "$work/run" \
    --data "$work/data/train.jsonl" --eval-data "$work/data/held-out.jsonl" --out "$work/run2" --epochs 3 \
    --lr 5e-4 --warmup-steps 20 --save-every 100 --eval-every 100 --save-dtype f16 --log-every 10 \
    2>&1 | tee "$work/train2.log"
$lw fit-conversions --model "$work/run2" --layers 2,4 --data "$work/data/train.jsonl" --out "$out" --save-dtype f16
mkdir -p "$out/training"
for stage in run run2; do
    cp "$work/$stage/training-log.json" "$out/training/$stage-log.json"
    cp "$work/$stage/loss-curve.svg" "$out/training/$stage-loss-curve.svg"
done
cp "$work/train.log" "$work/train2.log" "$out/training/"
{
    echo "# Held-out evaluation (tools/scripts/train_demo.sh)"
    echo
    echo '```'
    $lw eval perplexity --model "$out" --data "$work/data/held-out.jsonl" --all-plans --pair original,2 --pair original,4 --pair 4,2
    echo
    $lw eval last-word --model "$out" --data "$work/data/last-word.jsonl" --all-plans --pair original,2 --pair original,4 --pair 4,2
    echo '```'
} > "$out/EVAL.md"
cat "$out/EVAL.md"
