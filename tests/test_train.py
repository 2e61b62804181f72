"""The training loop in-process on the planted_rank task: compile once, checkpoints, refusals."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import planted
from lora_jax import LoraError
from lora_jax.adapter_io import load_adapter
from lora_jax.checkpoint import RunCheckpoints
from lora_jax.tasks import planted_rank
from lora_jax.trainer import train_and_evaluate


def tiny(**overrides):
    c = planted.get_config("smoke")
    c.planted_rank.width = 128  # base 3x128x128 weights, far larger than the rank-4 adapters
    c.steps, c.ckpt_every, c.log_every = 12, 6, 3
    c.optimizer.warmup_steps = 2
    c.update_from_flattened_dict(overrides)
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_run_compiles_once_learns_and_writes_its_outputs(tmp_path):
    res = train_and_evaluate(tiny(), str(tmp_path))
    assert res["step_traces"] == 1
    rows = _rows(tmp_path)
    assert rows[0]["step"] == 0 and rows[0]["setup/trainable_params"] == 3 * 2 * 128 * 4
    evals = [r for r in rows if "eval/mse" in r]
    assert [r["step"] for r in evals] == [0, 12]
    assert evals[-1]["eval/mse"] < 0.9 * evals[0]["eval/mse"]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    assert all({"lr", "grad_norm", "grad_norm_a", "grad_norm_b", "examples_per_s"} <= r.keys()
               for r in train_rows)
    assert os.listdir(tmp_path / "tb")
    adapters, info = load_adapter(str(tmp_path / "adapter"))
    assert res["trainable"]["extra"] == {}
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(res["trainable"]["adapters"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info["trainable_params"] == 3 * 2 * 128 * 4 and info["method"] == "lora"


def test_eval_at_start_off_evaluates_only_the_end(tmp_path):
    train_and_evaluate(tiny(eval_at_start=False), str(tmp_path))
    assert [r["step"] for r in _rows(tmp_path) if "eval/mse" in r] == [12]


def test_checkpoints_hold_no_base_weights(tmp_path):
    res = train_and_evaluate(tiny(**{"planted_rank.width": 256}), str(tmp_path))
    trainable = sum(x.nbytes for x in jax.tree.leaves(res["trainable"]))
    # Adam holds two moments per trainable value; the step counters are a few bytes. The
    # constant is Orbax's metadata (tree structure, shardings), which grows with leaf count only.
    expected = 3 * trainable
    base_bytes = 3 * 256 * 256 * 4
    for step in ("6", "12"):
        size = _dir_bytes(tmp_path / "ckpt" / step)
        assert size <= 1.05 * expected + 128 * 1024, (size, expected)
        assert size < base_bytes  # the base alone would not fit


def test_full_finetuning_runs_the_same_loop_and_saves_all_params(tmp_path):
    res = train_and_evaluate(tiny(method="full", **{"optimizer.lr": 1e-3}), str(tmp_path))
    assert res["step_traces"] == 1
    paths = {"/".join(str(getattr(k, "key", k)) for k in kp)
             for kp, _ in jax.tree_util.tree_leaves_with_path(res["trainable"])}
    assert paths == {f"layers_{i}/{n}" for i in range(3) for n in ("kernel", "bias")}
    assert _dir_bytes(tmp_path / "ckpt" / "12") > 3 * 128 * 128 * 4  # params + moments
    assert os.path.isdir(tmp_path / "finetuned")
    assert json.loads((tmp_path / "adapter.json").read_text())["method"] == "full"


def test_resume_continues_where_it_stopped(tmp_path):
    full = train_and_evaluate(tiny(), str(tmp_path / "a"))
    train_and_evaluate(tiny(), str(tmp_path / "b"))
    shutil.rmtree(tmp_path / "b" / "ckpt" / "12")  # as if the run had died after step 6's save
    resumed = train_and_evaluate(tiny(), str(tmp_path / "b"))
    assert resumed["start_step"] == 6
    for x, y in zip(jax.tree.leaves(full["trainable"]), jax.tree.leaves(resumed["trainable"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [r["step"] for r in _rows(tmp_path / "b") if "loss" in r] == [3, 6, 9, 12]


def test_corrupted_latest_checkpoint_is_reported_and_the_previous_used(tmp_path, caplog):
    train_and_evaluate(tiny(), str(tmp_path))
    state_dir = tmp_path / "ckpt" / "12" / "state"
    for root, _, files in os.walk(state_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    res = train_and_evaluate(tiny(steps=18), str(tmp_path))
    assert res["start_step"] == 6
    assert "checkpoint 12" in caplog.text and "unreadable" in caplog.text


def test_a_different_config_in_the_same_workdir_is_refused(tmp_path):
    train_and_evaluate(tiny(), str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(LoraError, match=r"holds a run of a different config \(differs in: lora\)"):
        train_and_evaluate(tiny(**{"lora.rank": 8}), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before
    res = train_and_evaluate(tiny(**{"lora.rank": 8, "resume": False}), str(tmp_path))
    assert res["start_step"] == 0


def test_restore_onto_another_base_or_spec_is_refused(tmp_path):
    fp = {"base_source": "m", "base_structure": "abc", "method": "lora", "lora": {"rank": 16}}
    ck = RunCheckpoints(str(tmp_path), 2, fp)
    state = {"x": np.zeros(3, np.float32)}
    ck.save(1, state, 1)
    ck.close()
    other = {**fp, "base_structure": "def", "lora": {"rank": 8}}
    with pytest.raises(LoraError) as info:
        RunCheckpoints(str(tmp_path), 2, other).restore(jax.eval_shape(lambda: state))
    msg = str(info.value)
    assert "base_structure: checkpoint 'abc', now 'def'" in msg and "lora.rank: checkpoint 16, now 8" in msg


def test_nan_loss_stops_the_run_naming_step_and_checkpoint(tmp_path):
    c = tiny(**{"optimizer.lr": 1e30, "optimizer.clip_norm": 0.0, "optimizer.warmup_steps": 0})
    with pytest.raises(LoraError, match=r"loss is (nan|inf) at step \d+; last good checkpoint: "):
        train_and_evaluate(c, str(tmp_path))


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    """For a mean loss, the average of microbatch gradients is the whole batch's gradient."""
    train_and_evaluate(tiny(), str(tmp_path / "one"))
    res = train_and_evaluate(tiny(grad_accum=4), str(tmp_path / "four"))
    assert res["step_traces"] == 1
    one = {r["step"]: r["loss"] for r in _rows(tmp_path / "one") if "loss" in r}
    four = {r["step"]: r["loss"] for r in _rows(tmp_path / "four") if "loss" in r}
    assert sorted(one) == sorted(four) == [3, 6, 9, 12]
    for step in one:
        assert abs(one[step] - four[step]) <= 1e-5, (step, one[step], four[step])


def test_extra_weights_train_in_full_beside_the_adapters(tmp_path):
    res = train_and_evaluate(tiny(**{"lora.train_also": r"layers_2/bias"}), str(tmp_path))
    extra = res["trainable"]["extra"]
    base = planted_rank.base_params(128, 3, 0)["layers_2"]["bias"]
    assert np.abs(np.asarray(extra["layers_2"]["bias"]) - base).max() > 1e-4  # it was trained
    assert os.path.isdir(tmp_path / "adapter" / "extra")
    with pytest.raises(LoraError, match=r"lora.train_also 'nothing' matches no parameter"):
        train_and_evaluate(tiny(**{"lora.train_also": "nothing"}), str(tmp_path / "bad"))
