"""Generation over a dataset's rows in batches, for Ray Data and other batch engines.

:class:`Generator` is a callable class over one batch of rows (a dict of column name to array, as Ray Data's
``map_batches`` hands them): it loads the model once, in ``__init__``, then each call generates for the batch's
prompt column through the engine's continuous-batching scheduler and returns the batch with the generation's
columns added. :func:`generate_dataset` wires it into a Ray dataset with one actor per machine, or per GPU::

    import ray
    from layerwise.batch import generate_dataset

    ds = ray.data.read_json("prompts.jsonl")                      # a column "text"
    out = generate_dataset(ds, "ibm/gpt2-medium-multiexit", concurrency=4,
                           multi_exit_config=layerwise.MultiExitConfiguration(use_original_head=False,
                                                                             contrast_layer_indices=("original", 12)),
                           max_new_tokens=64)
    out.write_json("generations/")

The same job runs on a laptop (``ray.init()`` starts a local instance) and on a cluster. Each actor uses the
machine's cores for one model, so ``concurrency`` is the number of machines (or GPUs, with ``num_gpus=1``), not
of cores. ``layerwise run`` is the single-machine tool with resume and per-row records; this path is for
datasets that outgrow one machine.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from . import LayerwiseError, Model, MultiExitConfiguration

__all__ = ["Generator", "generate_dataset"]


class Generator:
    """Generates for every row of a batch: ``batch[text_column]`` are the prompts (text); the batch comes back
    with ``generated_text``, ``generated_ids``, ``finish_reason`` and ``new_tokens`` added (names prefixed by
    ``prefix``). Generation keyword arguments are ``Model.generate``'s (transformers' names)."""

    def __init__(self, model: str, multi_exit_config: Optional[MultiExitConfiguration] = None,
                 text_column: str = "text", prefix: str = "", dtype: Optional[str] = None, device: str = "cpu",
                 adapter: Optional[str] = None, sequences_per_step: int = 16, **generate_kwargs: Any):
        self.model = Model.from_pretrained(model, multi_exit_config=multi_exit_config, dtype=dtype, device=device,
                                           adapter=adapter)
        if self.model.tokenizer is None:
            raise LayerwiseError(f"{model} has no tokenizer; Generator reads text prompts")
        self.text_column = text_column
        self.prefix = prefix
        self.sequences_per_step = sequences_per_step
        self.config = self.model._config(generate_kwargs)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if self.text_column not in batch:
            raise LayerwiseError(f"the batch has no column `{self.text_column}` (it has {sorted(batch)})")
        prompts = [self.model.tokenizer.encode(str(text)) for text in batch[self.text_column]]
        results = self.model._native.generate(prompts, self.config, self.sequences_per_step)
        ids: List[List[int]] = [list(sequences[0]) if sequences else [] for sequences, _ in results]
        out = dict(batch)
        out[self.prefix + "generated_text"] = np.array([self.model.tokenizer.decode(i) for i in ids], dtype=object)
        generated = np.empty(len(ids), dtype=object)
        generated[:] = [np.array(i, dtype=np.int64) for i in ids]
        out[self.prefix + "generated_ids"] = generated
        out[self.prefix + "finish_reason"] = np.array([reason for _, reason in results], dtype=object)
        out[self.prefix + "new_tokens"] = np.array([len(i) for i in ids], dtype=np.int64)
        return out


def generate_dataset(dataset, model: str, *, concurrency: int = 1, num_cpus: Optional[float] = None,
                     num_gpus: float = 0, batch_size: int = 64, **generator_kwargs: Any):
    """``dataset.map_batches`` with a :class:`Generator` per actor: ``concurrency`` actors (one per machine, or per
    GPU with ``num_gpus=1`` and ``device="cuda"``), ``batch_size`` rows handed to an actor at a time. ``num_cpus``
    is what each actor reserves in Ray's accounting (Ray's default: 1); leave Ray a CPU beside the actors for
    reading the dataset, or the read waits for a CPU the actors hold. Other keyword arguments go to
    :class:`Generator` (the model's configuration and generation arguments). Returns the lazy Ray dataset;
    nothing runs until it is consumed or written."""
    options: Dict[str, Any] = {}
    if num_cpus is not None:
        options["num_cpus"] = num_cpus
    if num_gpus:
        options["num_gpus"] = num_gpus
    return dataset.map_batches(Generator, fn_constructor_kwargs=dict(model=model, **generator_kwargs),
                               concurrency=concurrency, batch_size=batch_size, batch_format="numpy", **options)
