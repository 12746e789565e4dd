"""device="cuda" from Python, proven without a GPU: the engine's CUDA backend on the stand-in driver
(kernels/standin: the CUDA driver API over host memory, each launch run by the CPU build of the same kernel)
gives what the CPU gives; with no driver, "cuda" is a clear error and "auto" falls back to the CPU.

The stand-in is `libcuda.so` in the kernels crate's build folder (cargo builds it; LAYERWISE_STANDIN_DIR names
another), and it needs NVRTC on LD_LIBRARY_PATH to compile the kernels (.ci/run installs it). Without them the
stand-in test is skipped, unless LAYERWISE_TEST_EVERYTHING=1 (CI), where it fails instead."""
import glob
import os
import subprocess
import sys

import pytest

import layerwise
from layerwise import LayerwiseError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "gpt2-sharded")

CHILD = r"""
import sys
import numpy as np
import layerwise

model, prompts = sys.argv[1], [[4, 29, 86, 5], [7, 8]]
config = layerwise.MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 2))
gpu = layerwise.Model.from_pretrained(model, device="cuda", multi_exit_config=config)
cpu = layerwise.Model.from_pretrained(model, multi_exit_config=config)
assert "stand-in" in gpu.device, gpu.device
assert gpu.generate(prompts, max_new_tokens=6, eos_token_id=[]) == cpu.generate(prompts, max_new_tokens=6, eos_token_id=[])
got, want = gpu(prompts[0], output_hidden_states=True), cpu(prompts[0], output_hidden_states=True)
assert np.allclose(got.logits, want.logits, atol=1e-4), np.abs(got.logits - want.logits).max()
assert np.allclose(got.exit_logits[2], want.exit_logits[2], atol=1e-4)
(ll_gpu, greedy_gpu), = gpu._native.loglikelihood([([4, 29], [86, 5])])
(ll_cpu, greedy_cpu), = cpu._native.loglikelihood([([4, 29], [86, 5])])
assert abs(ll_gpu - ll_cpu) < 1e-4 and greedy_gpu == greedy_cpu
decoder = gpu.decoder()
seq = decoder.add_sequence(prompts[0])
scores = decoder.step()[seq]
assert np.allclose(scores, want.logits[0][-1], atol=1e-4), np.abs(scores - want.logits[0][-1]).max()
print("stand-in: ok")
"""


def stand_in_dir():
    if os.environ.get("LAYERWISE_STANDIN_DIR"):
        return os.environ["LAYERWISE_STANDIN_DIR"]
    found = glob.glob(os.path.join(ROOT, "target", "*", "build", "layerwise-kernels-*", "out", "stand-in",
                                   "libcuda.so"))
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


def test_without_a_driver_cuda_is_a_clear_error_and_auto_is_the_cpu():
    auto = layerwise.Model.from_pretrained(MODEL, device="auto")
    if auto.device != "cpu":
        pytest.skip(f"a CUDA driver and device are here ({auto.device})")
    with pytest.raises(LayerwiseError, match="device `cuda:1`: .*no CUDA driver"):
        layerwise.Model.from_pretrained(MODEL, device="cuda:1")
    with pytest.raises(LayerwiseError, match="device `tpu` is not one of cpu, cuda, cuda:N, auto"):
        layerwise.Model.from_pretrained(MODEL, device="tpu")


def test_cuda_on_the_stand_in_driver_equals_the_cpu():
    folder = stand_in_dir()
    if folder is None:
        if os.environ.get("LAYERWISE_TEST_EVERYTHING") == "1":
            pytest.fail("no stand-in driver under target/ (cargo builds it with the kernels crate)")
        pytest.skip("no stand-in driver under target/ (build the kernels crate first)")
    path = os.environ.get("LD_LIBRARY_PATH", "")
    env = dict(os.environ, LD_LIBRARY_PATH=folder + (":" + path if path else ""))
    run = subprocess.run([sys.executable, "-c", CHILD, MODEL], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "nvrtc" in run.stderr.lower() and os.environ.get("LAYERWISE_TEST_EVERYTHING") != "1":
        pytest.skip(f"NVRTC is missing for the stand-in: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0 and "stand-in: ok" in run.stdout, run.stdout + run.stderr[-3000:]
