"""The benchmark suite's plumbing: a tiny run writes both files with every section (no timing
asserted), and the scale-out planner compiles LoRA and full steps for a fake-device mesh."""

from __future__ import annotations

import json

import pytest

from benchmarks import plan, report, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run.run(str(out), smoke=True)


def test_smoke_writes_results_json_with_every_section(smoke):
    out, res = smoke
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == res
    for key in ("machine", "versions", "settings", "minilm", "llama", "machine_ceiling", "scaling",
                "adapter_io", "targets", "elapsed_s"):
        assert key in on_disk, key
    assert {"date", "cpu", "load_avg"} <= set(on_disk["machine"])
    assert {"jax", "flax"} <= set(on_disk["versions"])
    pair = on_disk["minilm"]["lora_vs_full"]
    for method in ("lora", "full"):
        assert {"median_s", "xla_flops", "argument_bytes", "temp_bytes", "optimizer_bytes",
                "analytic_flops"} <= set(pair[method])
        assert len(pair[method]["times_s"]) == on_disk["settings"]["steps"]
    assert {"xla_flops", "compiled_bytes", "step_time"} <= set(pair["ratios"])
    assert len(on_disk["llama"]) == len(on_disk["settings"]["widths"])
    assert "vs_handwritten" in on_disk["minilm"]
    assert "vs_peft" in on_disk["minilm"] or "skipped" in on_disk["minilm"]["peft"]
    if "vs_peft" in on_disk["minilm"]:  # equal math (no dropout), PEFT's dropout row, each side alone
        peft = on_disk["minilm"]["peft"]
        assert set(on_disk["minilm"]["vs_peft"]) == {"lora", "full", "lora+dropout"}
        assert (peft["lora"]["dropout"], peft["lora+dropout"]["dropout"]) == (False, True)
        alone = on_disk["minilm"]["alone"]
        assert "median_s" in alone["ours"] and "median_s" in alone["peft"], alone
    sc = on_disk["scaling"]
    assert [r["rank"] for r in sc["rank"]] == list(on_disk["settings"]["ranks"])
    assert [r["seq"] for r in sc["seq"]] == list(on_disk["settings"]["seqs"])
    assert {"merged_over_base", "max_abs_diff_merged_vs_unmerged"} <= set(on_disk["adapter_io"]["inference"])
    assert all({"target", "value", "limit", "met"} <= set(t) for t in on_disk["targets"])


def test_smoke_structure_is_deterministic_where_it_should_be(smoke):
    """Static facts, not timings: Adam keeps two moments per adapter value, merging is exact."""
    _, res = smoke
    ratio = res["minilm"]["lora_vs_full"]["lora_optimizer_over_adapter_bytes"]
    assert 2.0 <= ratio < 2.01
    assert res["adapter_io"]["inference"]["max_abs_diff_merged_vs_unmerged"] < 1e-4


def test_smoke_writes_markdown_sections(smoke):
    out, _ = smoke
    md = (out / "results.md").read_text()
    for heading in report.SECTIONS:
        assert heading in md, heading
    assert (out / "scaling.png").exists()


def test_plan_compiles_lora_and_full_for_a_fake_mesh():
    res = plan.plan("tiny", {"fsdp": 4, "data": 2}, rank=4, batch=8, seq=32)
    lora, full = res["lora"], res["full"]
    assert res["devices"] == 8
    for r in (lora, full):
        assert r["argument_bytes"] > 0 and r["temp_bytes"] >= 0
    assert lora["argument_bytes"] < full["argument_bytes"]
    # The hand count of the dominant terms agrees with what the compiled program holds.
    assert full["argument_bytes"] >= 0.9 * full["hand"]["state_bytes"]


def test_gpu_bench_small_runs_end_to_end_on_cpu(tmp_path):
    """`python -m benchmarks.gpu --small`: the prepared accelerator run's matrix in tiny shapes on
    CPU -- both model roles, both sides, both batch searches (simulated limits) -- in one run."""
    import math
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--small", "--out", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "gpu_results.json").read_text())["runs"]
    jax_runs = {(r["model"], r["policy"], r["scan"], r["batch"]): r for r in runs
                if r["side"] == "jax" and "median_s" in r}
    for r in jax_runs.values():
        assert r["remat"] == r["policy"] and len(r["times_s"]) == r["steps"] and r["tokens_per_s"] > 0
    none, dots = jax_runs[("1.1b", "none", True, 2)], jax_runs[("1.1b", "save_dots", True, 2)]
    assert math.isfinite(none["loss"]) and abs(none["loss"] - dots["loss"]) < 1e-3  # memory, not math
    assert any(k[0] == "1.1b" and not k[2] for k in jax_runs)  # the unrolled layout
    search = next(r for r in runs if r["side"] == "jax" and r["model"] == "8b" and len(r["batches"]) > 1)
    assert [(t["batch"], t["fits"]) for t in search["tried"]] == [(4, False), (2, True)]
    if _has("torch") and _has("peft"):
        peft = {(r["model"], r["gc"]): r for r in runs if r["side"] == "torch"}
        assert peft[("1.1b", True)]["adapter_params"] == none["adapter_params"]  # the same LoRA
        assert [t["fits"] for t in peft[("8b", True)]["tried"]] == [False, True]
        assert peft[("8b", False)]["error"].startswith("does not fit")
        assert jax_runs[("8b", "full", True, 1)]["vs_peft_best"] > 0  # timed again at PEFT's batch
    md = (tmp_path / "gpu_results.md").read_text()
    assert "| lora_jax, scan, remat=save_dots, attention=xla | 1.1b | 2 |" in md
    assert "causal attention NOT halved" in md


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_xla_flag_settings_start_each_process_as_labelled(monkeypatch):
    from benchmarks import xla_flags

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                       "--xla_cpu_experimental_ynn_fusion_type=")  # a measured flag already set
    assert xla_flags._env(None)["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    one = xla_flags._env("--xla_cpu_use_xnnpack=false")
    assert one["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_cpu_use_xnnpack=false"


def test_breakdown_times_asynchronous_thunks_to_their_end_marker():
    from types import SimpleNamespace as NS

    from benchmarks.breakdown import thunk_spans

    def ev(name, start, end):
        return NS(name=name, start_ns=start, end_ns=end)

    # a synchronous fusion (its marker inside its event) and an async dot launched in 1 us that
    # completes 50 us later, on another thread's line; twice each
    main = [ev("fusion.1", 0, 10_000), ev("end: fusion.1", 9_000, 9_000),
            ev("dot.2", 10_000, 11_000), ev("fusion.1", 100_000, 110_000),
            ev("end: fusion.1", 109_000, 109_000), ev("dot.2", 110_000, 111_000)]
    worker = [ev("end: dot.2", 60_000, 60_000), ev("end: dot.2", 160_000, 160_000),
              ev("unrelated", 0, 5_000)]
    data = NS(planes=[NS(lines=[NS(events=main), NS(events=worker)])])
    spans = thunk_spans(data, {"fusion.1": "x", "dot.2": "y"})
    assert spans == pytest.approx({"fusion.1": 20e-6, "dot.2": 100e-6})
