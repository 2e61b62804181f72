"""The planted_rank task has a known answer: LoRA with r >= k finds it, r < k cannot."""

import jax
import numpy as np
import pytest

from configs import planted
from lora_jax.tasks import planted_rank
from lora_jax.trainer import train_and_evaluate


def _run(tmp_path, rank):
    c = planted.get_config()  # k = 4 planted on layers_1/kernel, 300 steps
    c.lora.rank = rank
    c.lora.alpha = float(rank)
    return train_and_evaluate(c, str(tmp_path / f"r{rank}"))["eval"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    return {r: _run(tmp, r) for r in (2, 4, 8)}


def test_rank_at_least_k_fits_the_teacher_and_recovers_the_subspace(results):
    for r in (4, 8):
        res = results[r]
        assert res["eval/mse"] < 0.01 * res["eval/base_mse"], (r, res)
        assert res["eval/overlap/layers_1/kernel"] > 0.9, (r, res)


def test_rank_below_k_plateaus(results):
    low, ok = results[2], results[4]
    assert low["eval/mse"] > 10 * ok["eval/mse"]
    assert low["eval/overlap/layers_1/kernel"] < 0.9


def test_batches_are_a_pure_function_of_position():
    c = planted.get_config()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    task = planted_rank.build(c, lambda path, shape: one, "")
    first = [next(task.batches(p)) for p in range(3)]
    it = task.batches(0)
    again = [next(it) for _ in range(3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
    assert not np.array_equal(first[0]["x"], first[1]["x"])
