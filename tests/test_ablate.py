"""Ablation sweeps: configs are well-formed, smoke sweeps write a sane CSV/markdown/PNGs, reruns skip.

Which smoke sweeps run end to end is set by LORA_JAX_ABLATE_TESTS (comma-separated config names;
default: all eight, about 2.5 minutes together), so a local run can trade coverage for time.
"""

import csv
import glob
import importlib
import os
import subprocess
import sys

import pytest

from configs.lm import pretrain as pretrain_config
from lora_jax.ablate import apply_overrides, run_ablation, run_name
from lora_jax.ablate.kinds_weights import split_path
from lora_jax.errors import LoraError
from lora_jax.pretrain import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs/ablations/[!_]*.py")))
ALL = "planted_rank,subspace,scaling,rank_targets,amplification,loraplus_init,forgetting,variants"
END_TO_END = os.environ.get("LORA_JAX_ABLATE_TESTS", ALL).split(",")
PNG = b"\x89PNG\r\n\x1a\n"


def _config(name, arg="smoke"):
    return importlib.import_module(f"configs.ablations.{name}").get_config(arg)


def test_all_seven_experiments_exist():
    expected = {"rank_targets", "scaling", "subspace", "amplification", "forgetting", "planted_rank",
                "loraplus_init"}
    assert expected <= set(NAMES)


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("name", NAMES)
def test_every_sweep_entry_applies_to_its_run_config(name, arg):
    c = _config(name, arg)
    names = [run_name(e) for e in c.sweep]
    assert len(set(names)) == len(names) > 1
    for entry in c.sweep:
        run = apply_overrides(c.run, {k: v for k, v in entry.items() if k not in ("name", "tags")})
        for key, value in entry.items():
            if key not in ("name", "tags"):
                node = run
                for part in key.split("."):
                    node = node[part]
                assert node == value, (name, key)


def test_overrides_copy_the_base_and_reject_unknown_or_mistyped_fields():
    c = _config("planted_rank")
    run = apply_overrides(c.run, {"lora.rank": 7, "lora.alpha": 3})
    assert run.lora.rank == 7 and run.lora.alpha == 3.0 and c.run.lora.rank != 7
    with pytest.raises(LoraError, match="no field 'rnak'"):
        apply_overrides(c.run, {"lora.rnak": 7})
    with pytest.raises(LoraError, match="no section 'lroa'"):
        apply_overrides(c.run, {"lroa.rank": 7})
    with pytest.raises(LoraError, match="lora.rank"):
        apply_overrides(c.run, {"lora.rank": 2.5})


def test_split_path_names_layer_and_weight_type():
    assert split_path("params/encoder/layer_3/attention/self/query/kernel") == (3, "attention/self/query")
    assert split_path("params/encoder/layer_0/output/dense/kernel") == (0, "output/dense")
    assert split_path("model/layers_2/self_attn/q_proj/kernel") == (2, "self_attn/q_proj")
    assert split_path("layers_1/kernel") == (1, "kernel")


def _check_outputs(workdir, config):
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [run_name(e) for e in config.sweep]
    for r in rows:
        assert float(r[config.metric]) == float(r[config.metric])  # a number, not nan or empty
        assert int(r["trainable_params"]) > 0
    with open(os.path.join(workdir, "results.md")) as f:
        md = f.read()
    runs = md.split("## Runs")[1].split("##")[0]
    table = [line for line in runs.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(config.sweep)  # header, separator, one row per run
    assert len({line.count("|") for line in table}) == 1
    assert "Paper" in md
    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "*.png")))
    assert pngs
    for p in pngs:
        assert f"]({p})" in md
        with open(os.path.join(workdir, p), "rb") as f:
            head = f.read(8)
        assert head == PNG and os.path.getsize(os.path.join(workdir, p)) > 2000
    return rows, md


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = {}
    for name in [n for n in END_TO_END if n]:
        workdir = str(tmp_path_factory.mktemp(name))
        config = _config(name)
        if name == "forgetting":  # adapts a pretrained causal_lm base: make the smoke one here
            pre = pretrain_config.get_config("smoke")
            pre.causal_lm.base_dir = os.path.join(workdir, "base")
            config.run.model.path = pretrain(pre, os.path.join(workdir, "pretrain"))
        run_ablation(config, workdir, log=lambda s: None)
        out[name] = (workdir, config)
    return out


@pytest.mark.parametrize("name", [n for n in END_TO_END if n])
def test_smoke_sweep_writes_csv_markdown_and_pngs(swept, name):
    workdir, config = swept[name]
    _check_outputs(workdir, config)


def test_planted_rank_smoke_finds_the_knee(swept):
    if "planted_rank" not in swept:
        pytest.skip("planted_rank not in LORA_JAX_ABLATE_TESTS")
    _, md = _check_outputs(*swept["planted_rank"])
    knee_table = md.split("first rank <")[1]
    assert "| 2 | 2 |" in knee_table and "| yes |" in knee_table


def test_rerun_skips_finished_runs_and_rewrites_the_same_tables(swept):
    name = next(iter(swept))
    workdir, config = swept[name]
    with open(os.path.join(workdir, "results.csv")) as f:
        before = f.read()
    os.remove(os.path.join(workdir, "results.csv"))

    def no_training(config, run_dir):
        raise AssertionError(f"{run_dir} was trained again")

    result = run_ablation(config, workdir, train=no_training, log=lambda s: None)
    assert all(r.skipped for r in result["records"])
    with open(os.path.join(workdir, "results.csv")) as f:
        assert f.read() == before


def test_a_finished_run_with_a_changed_config_is_refused(swept):
    name = next(iter(swept))
    workdir, config = swept[name]
    changed = _config(name)
    changed.run.optimizer.lr = 0.5
    with pytest.raises(LoraError, match="different config"):
        run_ablation(changed, workdir, log=lambda s: None)


def test_cli_report_only_rebuilds_tables_and_refuses_missing_runs(swept, tmp_path):
    name = next(iter(swept))
    workdir, _ = swept[name]
    cmd = [sys.executable, "-m", "experiments.ablate", f"--config=configs/ablations/{name}.py:smoke",
           "--report_only"]
    ok = subprocess.run([*cmd, f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "done:" in ok.stdout
    bad = subprocess.run([*cmd, f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "not finished" in bad.stderr
