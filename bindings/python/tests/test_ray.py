"""Generation over a dataset on Ray Data (layerwise.batch): a local Ray instance, two actors, every row back
exactly once with what the model generates for it alone. Needs ray[data] (CI installs it); skipped without it
unless LAYERWISE_TEST_EVERYTHING=1, which CI sets so that it cannot pass by skipping."""
import json
import os

import pytest

if os.environ.get("LAYERWISE_TEST_EVERYTHING") != "1":
    pytest.importorskip("ray")

import layerwise
from layerwise.batch import Generator, generate_dataset

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "fixtures")
MODEL = os.path.abspath(os.path.join(FIXTURES, "demo-gpt2-multiexit"))
WORDS = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are the meek", "Jesus wept"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Three CPUs in Ray's accounting (two actors and the read; this machine may have fewer), each actor's
    # engine on one thread.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def test_every_row_comes_back_once_with_its_generation(ray_local, tmp_path):
    rows = [{"id": i, "text": f"{WORDS[i % len(WORDS)]} {i}"} for i in range(40)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = layerwise.MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 2))
    dataset = ray_local.data.read_json(str(data), override_num_blocks=5)
    out = generate_dataset(dataset, MODEL, concurrency=2, batch_size=8, multi_exit_config=config,
                           max_new_tokens=5).take_all()
    assert sorted(int(r["id"]) for r in out) == list(range(40)), "every row exactly once"
    model = layerwise.Model.from_pretrained(MODEL, multi_exit_config=config)
    for row in out:
        alone = model.generate_text(row["text"], max_new_tokens=5)
        assert row["generated_text"] == alone, row["id"]
        assert row["new_tokens"] == len(row["generated_ids"]) and row["finish_reason"] in ("length", "eos")


def test_the_generator_alone_names_a_missing_column():
    generator = Generator(MODEL, text_column="prompt", max_new_tokens=2)
    with pytest.raises(layerwise.LayerwiseError, match="no column `prompt`"):
        generator({"text": ["In the beginning"]})
    batch = generator({"prompt": ["In the beginning", "Jesus wept"], "id": [1, 2]})
    assert list(batch["id"]) == [1, 2] and len(batch["generated_text"]) == 2
