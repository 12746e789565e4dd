"""Record GGUF's Q8_0 quantisation of a small matrix, the reference `--dtype q8` is held to.

The quantiser is gguf-py's (llama.cpp's own Python port of ggml's `quantize_row_q8_0_ref`), from the
llama.cpp source that `tools/llama-cpp-compare` downloads: run that once, then

    PYTHONPATH=~/.cache/layerwise-llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py \\
        python tools/scripts/make_q8_fixtures.py --out tests/fixtures/q8/q8_0.json

The matrix (4 rows of 96) mixes random values, exact halves after scaling (rounding away from zero),
a zero block, a block of one nonzero value, and tiny and large magnitudes.
"""

import argparse
import json

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize


def matrix() -> np.ndarray:
    rng = np.random.default_rng(7)
    m = rng.standard_normal((4, 96)).astype(np.float32)
    m[0, :32] = 0.0
    m[0, 32:64] = 0.0
    m[0, 40] = -3.5
    half = np.float32(1.27) / np.float32(127.0)  # scale 0.01: k + 0.5 steps round away from zero
    m[1, :32] = np.array([1.27] + [(k + 0.5) * half * (-1) ** k for k in range(31)], dtype=np.float32)
    m[2, 64:] *= np.float32(1e-6)
    m[3, 32:64] *= np.float32(1e3)
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    m = matrix()
    q = quantize(m, GGMLQuantizationType.Q8_0)  # [rows, blocks * 34]: f16 scale (LE) + 32 int8
    rows = []
    for r in range(m.shape[0]):
        blocks = q[r].reshape(-1, 34)
        rows.append(
            {
                "scales": [int(b[0]) | int(b[1]) << 8 for b in blocks],
                "quants": [int(v) for b in blocks for v in b[2:].view(np.int8)],
            }
        )
    out = {
        "source": "gguf-py (llama.cpp, llama-cpp-python 0.3.36 sdist) gguf.quants.quantize(Q8_0)",
        "rows": m.shape[0],
        "cols": m.shape[1],
        "values": [float(v) for v in m.reshape(-1)],
        "expected": rows,
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
