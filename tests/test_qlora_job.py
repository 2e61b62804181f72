"""The main job on a quantised frozen base (model.quant): QLoRA trains, saves only adapters, exports
a PEFT adapter for the dense base; combinations that cannot work are one error, nothing written."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.lm import lora as lora_config
from configs.lm import pretrain as pretrain_config
from lora_jax import LoraError
from lora_jax.pretrain import pretrain
from lora_jax.trainer import train_and_evaluate
from tests.test_causal_lm import _evals, _tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    pre = _tiny(pretrain_config.get_config("smoke"), tmp)
    pre.causal_lm.layers, pre.causal_lm.hidden_size, pre.causal_lm.intermediate_size = 2, 64, 128
    return tmp, pretrain(pre, str(tmp / "pre_run")), _evals(tmp / "pre_run")[-1]


def _adapt(tmp, out, **fields):
    c = _tiny(lora_config.get_config("smoke"), tmp)
    c.causal_lm.layers, c.causal_lm.hidden_size, c.causal_lm.intermediate_size = 2, 64, 128
    c.model.path, c.steps = out, 4
    c.update_from_flattened_dict(fields)
    return c


@pytest.mark.parametrize("kind,scan", [("nf4", True), ("int8", False)])
def test_qlora_run_starts_at_the_quantised_base_and_saves_only_adapters(base, tmp_path, kind, scan):
    tmp, out, base_end = base
    base_params = sum(v.size for v in load_file(os.path.join(out, "model.safetensors")).values())
    c = _adapt(tmp, out, **{"model.quant": kind, "model.scan_layers": scan})
    workdir = tmp_path / "run"
    res = train_and_evaluate(c, str(workdir))
    start = _evals(workdir)[0]
    dense, quantised = base_end["eval/source_loss"], start["eval/source_loss"]
    # the quantised base is the dense one up to rounding: close, but not the same numbers
    assert quantised != dense and abs(quantised - dense) < 0.05 * dense, (quantised, dense)
    assert res["step_traces"] == 1
    setup = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["setup/base_params"] == base_params  # the weights a quantised kernel stands for
    saved = load_file(os.path.join(workdir, "peft", "adapter_model.safetensors"))
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)  # on the dense base's names
    assert not res["trainable"]["extra"]
    meta = " ".join(Path(d, f).read_text(errors="ignore") for d, _, fs in os.walk(workdir / "ckpt")
                    for f in fs if "METADATA" in f)
    assert "adapters" in meta and "codes" not in meta and "absmax" not in meta  # no base in checkpoints


@pytest.mark.parametrize("fields,message", [
    ({"method": "full"}, r"model.quant='nf4'; expected 'none' with method='full'"),
    ({"lora.train_also": r".*layers_0/mlp/up_proj/kernel"},
     r"matches 'params/model/layers_0/mlp/up_proj/kernel', a quantised weight"),
])
def test_qlora_refusals_write_nothing(base, tmp_path, fields, message):
    tmp, out, _ = base
    c = _adapt(tmp, out, **{"model.quant": "nf4", **fields})
    with pytest.raises(LoraError, match=message):
        train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    np.testing.assert_equal(os.path.exists(out), True)
