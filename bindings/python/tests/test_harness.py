"""The lm-evaluation-harness model `layerwise` against the harness's own HF model, live, on local tasks.

Four tasks over the JSON Lines files in tests/fixtures/harness/ (written here as task YAML with absolute paths):
a LAMBADA-style last-word task (loglikelihood: perplexity, acc), a multiple-choice task (acc, acc_norm; one
question empty, so a context is the empty string), a generate_until task (stop sequences, exact_match) and a
rolling-perplexity task (loglikelihood_rolling: word/byte perplexity, bits per byte). The checkpoint is the demo
fixture (GPT-2's tokenizer, a 64-token context, exits at 2 and 4), so the longer texts are cut as the harness
cuts them.

The reference runs in this process: lm-eval 0.4.8's `HFLM` on transformers for the original head, and on
upstream autocontrastive-gen's `AutoMultiExitModel` (the multi-exit model the harness evaluates upstream) for an
exit and a contrast. The `layerwise` model runs as users run it: the `lm_eval` command in a subprocess, found by
name through the wheel's hook. Needs torch, transformers, lm-eval and autocontrastive-gen (CI installs them);
skipped without them unless LAYERWISE_TEST_EVERYTHING=1, which CI sets so that it cannot pass by skipping.
"""
import json
import math
import os
import subprocess
import sys

import pytest

if os.environ.get("LAYERWISE_TEST_EVERYTHING") != "1":
    for module in ("torch", "transformers", "lm_eval", "autocontrastive_gen"):
        pytest.importorskip(module)

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "fixtures")
MODEL = os.path.abspath(os.path.join(FIXTURES, "demo-gpt2-multiexit"))
DATA = os.path.abspath(os.path.join(FIXTURES, "harness"))

TASKS = {
    "lw_last_word": """
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "lw_choice": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "lw_generate": """
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: [" table", " Again", "\\n"]
  max_gen_toks: 10
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "lw_documents": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}
DATA_FILES = {"lw_last_word": "last_word.jsonl", "lw_choice": "choice.jsonl", "lw_generate": "generate.jsonl",
              "lw_documents": "documents.jsonl"}

# (name, the --model_args of the plan, upstream's MultiExitConfiguration fields or None for the plain HF model)
PLANS = [
    ("original", "", None),
    ("exit_2", ",use_original_head=False,output_layer_index=2",
     {"use_original_head": False, "output_layer_index": 2}),
    ("contrast_original_2", ",use_original_head=False,contrast_layer_indices=original;2",
     {"use_original_head": False, "contrast_layer_indices": ("original", 2)}),
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness-tasks")
    for task, body in TASKS.items():
        data = os.path.join(DATA, DATA_FILES[task])
        header = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                  "test_split: test\nmetadata:\n  version: 1.0\n")
        (folder / f"{task}.yaml").write_text(header + body)
    return str(folder)


def metrics_of(results):
    """{task: {metric: value}} of a results dict, without the stderr entries."""
    return {task: {k.split(",")[0]: v for k, v in values.items()
                   if "," in k and not k.split(",")[0].endswith("_stderr")}
            for task, values in results["results"].items()}


def reference(task_dir, fields):
    """The harness's numbers with its HF model: plain transformers, or upstream's multi-exit model."""
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.manual_seed(0)
    if fields is None:
        lm = HFLM(pretrained=MODEL, dtype="float32", batch_size=1, device="cpu")
    else:
        from autocontrastive_gen.modeling.auto_model import AutoMultiExitModel
        from autocontrastive_gen.modeling.configuration import MultiExitConfiguration

        model = AutoMultiExitModel.from_pretrained(MODEL, multi_exit_config=MultiExitConfiguration(**fields),
                                                   torch_dtype=torch.float32)
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(MODEL), batch_size=1,
                  device="cpu")
    results = simple_evaluate(model=lm, tasks=sorted(TASKS), task_manager=TaskManager(include_path=task_dir),
                              log_samples=True)
    return results


def layerwise_cli(task_dir, tmp_path, model_args):
    """`lm_eval --model layerwise ...` as a user types it; the results JSON it writes."""
    out = tmp_path / "out"
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    command = [lm_eval, "--model", "layerwise", "--model_args", f"pretrained={MODEL},dtype=float32{model_args}",
               "--tasks", ",".join(sorted(TASKS)), "--include_path", task_dir, "--batch_size", "1",
               "--output_path", str(out), "--log_samples"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    written = [os.path.join(root, f) for root, _, files in os.walk(out) for f in files if f.startswith("results")]
    assert len(written) == 1, written
    return json.load(open(written[0]))


@pytest.mark.parametrize("name,model_args,fields", PLANS, ids=[p[0] for p in PLANS])
def test_lm_eval_numbers_equal_the_hf_model(task_dir, tmp_path, name, model_args, fields):
    want = reference(task_dir, fields)
    got = layerwise_cli(task_dir, tmp_path, model_args)
    want_metrics, got_metrics = metrics_of(want), metrics_of(got)
    assert sorted(got_metrics) == sorted(TASKS)
    for task in TASKS:
        assert sorted(got_metrics[task]) == sorted(want_metrics[task]), task
        for metric, value in want_metrics[task].items():
            if metric in ("acc", "acc_norm", "exact_match"):
                assert got_metrics[task][metric] == value, f"{name} {task} {metric}"
            else:
                assert math.isclose(got_metrics[task][metric], value, rel_tol=2e-5), f"{name} {task} {metric}"
    # Every request's answer, not only the aggregates: generations equal as text, scores to f32 rounding.
    samples = {task: {s["doc_id"]: s for s in rows} for task, rows in want["samples"].items()}
    for task in TASKS:
        assert got["n-samples"][task]["effective"] == len(samples[task]), task
    generated = {task: {} for task in TASKS}
    for root, _, files in os.walk(tmp_path / "out"):
        for f in files:
            if f.startswith("samples_"):
                task = f[len("samples_"):].rsplit("_", 1)[0]
                for line in open(os.path.join(root, f)):
                    row = json.loads(line)
                    generated[task][row["doc_id"]] = row
    for task in TASKS:
        assert sorted(generated[task]) == sorted(samples[task]), task
        for doc_id, row in generated[task].items():
            mine, theirs = row["filtered_resps"], samples[task][doc_id]["filtered_resps"]
            assert len(mine) == len(theirs), f"{name} {task} doc {doc_id}"
            for a, b in zip(mine, theirs):
                if isinstance(b, str):  # a generation
                    assert a == b, f"{name} doc {doc_id}"
                elif isinstance(b, (tuple, list)):  # (loglikelihood, greedy); the JSON holds them as text
                    assert math.isclose(float(a[0]), b[0], rel_tol=1e-5, abs_tol=1e-4), f"{name} {task} {doc_id}"
                    assert a[1] == str(b[1]), f"{name} {task} doc {doc_id} greedy"
                else:  # a rolling log-likelihood
                    assert math.isclose(float(a), b, rel_tol=1e-5, abs_tol=1e-4), f"{name} {task} {doc_id}"
