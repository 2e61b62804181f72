"""Damaged arrays on disk are caught by their checksums: run checkpoints, exported adapters, PEFT files."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lora_jax import LoraError
from lora_jax.adapter_io import load_adapter, load_tree, save_adapter, save_tree
from lora_jax.adapters import Adapter
from lora_jax.checkpoint import RunCheckpoints
from lora_jax.integrity import checksums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/planted.py", "--config.log_every=1", "--config.eval_every=0",
        "--config.steps=20", "--config.ckpt_every=10"]
FACTOR = "trainable.adapters.layers_1.kernel.a"
ADAM_MU = "opt_state.1.inner_states.a.inner_state.0.mu.adapters.layers_1.kernel.a"


def _run(workdir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *ARGS, f"--workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _flip(path, n=64):
    """XOR n bytes in the middle of a file: damage that keeps its size and usually its format."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    mid = len(data) // 2
    for i in range(mid - n // 2, mid + n // 2):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    _run(workdir)
    return load_adapter(str(workdir / "adapter"))[0]


@pytest.mark.parametrize("array", [FACTOR, ADAM_MU])
def test_damaged_array_in_latest_checkpoint_is_reported_and_the_previous_used(tmp_path, straight, array):
    _run(tmp_path)
    shutil.rmtree(tmp_path / "adapter")  # as if the run had died right after its last save
    (tmp_path / "adapter.json").unlink()
    _flip(str(tmp_path / "ckpt" / "20" / "state" / array / "0.0"))
    proc = _run(tmp_path)
    lines = [line for line in proc.stderr.splitlines() if "damaged" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert re.search(rf"checkpoint 20 in .* is damaged: array {array.replace('.', '/')} "
                     rf"\(.*/20/state/{re.escape(array)}\) does not match the checksum", lines[0]), lines[0]
    assert "resuming at step 10" in proc.stdout + proc.stderr
    assert (tmp_path / "ckpt" / "corrupt-20").is_dir() and (tmp_path / "ckpt" / "20").is_dir()
    _assert_same(straight, load_adapter(str(tmp_path / "adapter"))[0])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))  # each step logged once


def test_last_good_checkpoint_is_the_newest_that_verifies_and_is_finite(tmp_path, caplog):
    ck = RunCheckpoints(str(tmp_path), 5, {"base_source": "m"})
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    ck.save(1, {"x": x}, 1)
    ck.save(2, {"x": 2 * x}, 2)
    ck.save(3, {"x": np.full_like(x, np.nan)}, 3)
    ck.close()
    abstract = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype)}
    assert RunCheckpoints(str(tmp_path), 5, {"base_source": "m"}).last_good(abstract) == 2
    _flip(str(tmp_path / "2" / "state" / "x" / "0.0"))
    ck = RunCheckpoints(str(tmp_path), 5, {"base_source": "m"})
    assert ck.last_good(abstract) == 1
    assert "checkpoint 2 in" in caplog.text and "is damaged: array x" in caplog.text
    ck.close()


def test_checksums_agree_across_shardings_and_see_a_one_ulp_change():
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    x = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    assert checksums({"x": x}) == checksums({"x": sharded})
    y = x.copy()
    y[17, 5] = np.nextafter(y[17, 5], np.float32(np.inf))
    swapped = x[[1, 0, *range(2, 64)]]
    base = checksums({"x": x})[0]["x"]
    assert checksums({"x": y})[0]["x"] != base and checksums({"x": swapped})[0]["x"] != base


def test_a_damaged_exported_adapter_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    ad = {"layers_0": {"kernel": Adapter(rng.standard_normal((1024, 16)).astype(np.float32),
                                         rng.standard_normal((16, 1024)).astype(np.float32),
                                         1.0, (), (0,), (1,))}}
    save_adapter(str(tmp_path / "ad"), ad, {"name": "x"})
    _assert_same(ad, load_adapter(str(tmp_path / "ad"))[0])
    _flip(_largest_file(tmp_path / "ad" / "arrays"))  # inside one factor's compressed chunk
    with pytest.raises(LoraError, match=r"adapter at .* is damaged: array layers_0/kernel/[ab] does not "
                                        r"match the checksum saved with it; refusing to load it$"):
        load_adapter(str(tmp_path / "ad"))


def test_a_damaged_saved_tree_is_refused(tmp_path):
    """train_also weights (adapter/extra) and full fine-tunes (finetuned/) are saved as trees."""
    rng = np.random.default_rng(1)
    tree = {"head": {"kernel": rng.standard_normal((512, 64)).astype(np.float32)},
            "step": np.int32(7)}
    save_tree(str(tmp_path / "t"), tree)
    _assert_same(tree, load_tree(str(tmp_path / "t")))
    _flip(_largest_file(tmp_path / "t" / "arrays"))
    with pytest.raises(LoraError, match=r"saved tree at .* is damaged: array head/kernel does not match "
                                        r"the checksum saved with it; refusing to load it$"):
        load_tree(str(tmp_path / "t"))
    with pytest.raises(LoraError, match=r"no saved tree at .*: expected .*tree.json"):
        load_tree(str(tmp_path / "missing"))


def test_a_damaged_peft_file_we_wrote_is_refused(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import lora_jax
    import lora_jax.models as M
    from lora_jax import peft as lpeft

    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "base")
    model = M.load(tmp_path / "base")
    ids = np.ones((1, 8), np.int32)
    spec = lora_jax.LoraSpec(targets=M.DEFAULT_TARGETS["bert"], rank=8, alpha=16.0, init="gaussian")
    ad = lora_jax.init(jax.random.key(0), model.fn, model.params, ids, ids, spec=spec)
    lpeft.save_adapter(tmp_path / "ad", ad, model)
    lpeft.load_adapter(tmp_path / "ad", model)  # intact: loads
    path = tmp_path / "ad" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header + (len(data) - 8 - header) // 2  # in the middle of the tensor data
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(LoraError, match=r"adapter_model.safetensors is damaged: tensor 'base_model.model.*' "
                                        r"does not match the SHA-256 saved with it; refusing to load it$"):
        lpeft.load_adapter(tmp_path / "ad", model)
