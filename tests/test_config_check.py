"""configs/base.py's declared rules as check_config holds runs to them: an invalid value for every
field, every config file in configs/, and the CLI's contract (one `error:` line, exit 1, no
workdir) end to end for the defects that used to slip through."""

import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from configs import base
from lora_jax import LoraError
from lora_jax.ablate.sweep import apply_overrides, overrides_of
from lora_jax.config_check import check_config
from lora_jax.config_rules import declared_fields, parse_rule
from lora_jax.trainer import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
FIELDS = declared_fields()
UNCONSTRAINED = ("str",)  # rules that allow any value of their type: no invalid case to list

# Contexts: overrides under which the bad value is read (each alone is a valid config).
CONTEXTS = {
    "code_search": {},
    "planted": {"task": "planted_rank", "model.path": ""},
    "scratch": {"task": "causal_lm", "model.path": ""},
    "base": {"task": "causal_lm", "model.path": "{tmp}/model"},
    "jsonl": {"task": "jsonl_sft", "model.path": "{tmp}/model", "jsonl.train": "{tmp}/train.jsonl",
              "jsonl.eval": "{tmp}/eval.jsonl"},
    "steps20": {"steps": 20},
    "accum4": {"grad_accum": 4},
}
# (field, invalid value, context); "{tmp}" is a directory holding file.txt, empty/, model/config.json
# and the two .jsonl files.
BAD = [
    ("seed", -1, "code_search"), ("seed", 0.5, "code_search"),
    ("task", "nope", "code_search"), ("task", "corpora", "code_search"),  # a helper, not a task
    ("method", "half", "code_search"),
    ("resume", "yes", "code_search"),
    ("model.path", "/no/such/model", "code_search"), ("model.path", "", "code_search"),
    ("model.path", "{tmp}/file.txt", "code_search"), ("model.path", "{tmp}/empty", "jsonl"),
    ("model.path", "{tmp}/empty", "base"),
    ("model.dtype", "float64", "code_search"), ("model.dtype", "fp8", "planted"),
    ("model.scan_layers", "no", "code_search"),
    ("model.remat", "dots", "code_search"),
    ("model.quant", "int4", "code_search"),
    ("model.attention", "flash", "code_search"),
    ("model.dropout", "yes", "code_search"),
    ("lora.targets", "(", "code_search"), ("lora.targets", "", "code_search"),
    ("lora.rank", 0, "code_search"), ("lora.rank", 2.0, "code_search"),
    ("lora.alpha", 0.0, "code_search"), ("lora.alpha", math.nan, "code_search"),
    ("lora.scaling", "sqrt", "code_search"),
    ("lora.init", "zeros", "code_search"),
    ("lora.dropout", 1.0, "code_search"), ("lora.dropout", -0.1, "code_search"),
    ("lora.train_also", "[", "code_search"),
    ("lora.dora", "yes", "code_search"),
    ("optimizer.lr", -0.001, "code_search"), ("optimizer.lr", 0.0, "code_search"),
    ("optimizer.lr", math.inf, "code_search"),
    ("optimizer.warmup_steps", -1, "code_search"), ("optimizer.warmup_steps", 20, "steps20"),
    ("optimizer.end_lr_ratio", 1.5, "code_search"),
    ("optimizer.weight_decay", -0.1, "code_search"),
    ("optimizer.clip_norm", -1.0, "code_search"),
    ("optimizer.b1", 1.0, "code_search"),
    ("optimizer.b2", 1.5, "code_search"),
    ("optimizer.loraplus_ratio", 0.0, "code_search"),
    ("batch_size", 0, "code_search"), ("batch_size", 30, "accum4"),
    ("grad_accum", 0, "code_search"),
    ("steps", -5, "code_search"),
    ("epochs", 0.0, "code_search"),
    ("log_every", 0, "code_search"),
    ("eval_every", -1, "code_search"),
    ("eval_at_start", 1, "code_search"),
    ("ckpt_every", 0, "code_search"),
    ("keep_checkpoints", 0, "code_search"),
    ("mesh.data", 0, "code_search"), ("mesh.data", -2, "code_search"),
    ("mesh.fsdp", -1, "code_search"),  # mesh.data is -1 already
    ("mesh.tensor", 0, "code_search"),
    ("code_search.query_len", 1, "code_search"),
    ("code_search.code_len", 0, "code_search"),
    ("code_search.temperature", 0.0, "code_search"),
    ("code_search.holdout", 0.0, "code_search"), ("code_search.holdout", 1.0, "code_search"),
    ("code_search.max_train", -1, "code_search"),
    ("code_search.max_eval", -1, "code_search"),
    ("code_search.eval_batch", 0, "code_search"),
    ("planted_rank.width", 0, "planted"),
    ("planted_rank.layers", 0, "planted"),
    ("planted_rank.planted_k", 0, "planted"), ("planted_rank.planted_k", 100, "planted"),
    ("planted_rank.planted_norm", 0.0, "planted"),
    ("planted_rank.planted", "layers_9/kernel", "planted"),
    ("planted_rank.planted", "layers_1/bias", "planted"),
    ("planted_rank.planted", "(", "planted"),
    ("planted_rank.eval_examples", 0, "planted"),
    ("planted_rank.train_examples", 0, "planted"),
    ("causal_lm.source", "no_such_corpus_xyz", "scratch"), ("causal_lm.source", "not a name", "scratch"),
    ("causal_lm.target", "no_such_corpus_xyz", "scratch"),
    ("causal_lm.train_on", "both", "scratch"),
    ("causal_lm.holdout", 1.0, "scratch"),
    ("causal_lm.seq_len", 1, "scratch"),
    ("causal_lm.eval_windows", 0, "scratch"),
    ("causal_lm.eval_batch", 0, "scratch"),
    ("causal_lm.hidden_size", 0, "scratch"),
    ("causal_lm.intermediate_size", 0, "scratch"),
    ("causal_lm.layers", 0, "scratch"),
    ("causal_lm.family", "mistral", "scratch"),
    ("causal_lm.heads", 0, "scratch"), ("causal_lm.heads", 5, "scratch"),
    ("causal_lm.heads", 64, "scratch"),  # 192 / 64 = 3: odd, rotary embeddings need halves
    ("causal_lm.base_dir", "{tmp}/file.txt", "scratch"),
    ("causal_lm.base_config", "configs/nope.py", "base"),
    ("causal_lm.base_config", "configs/nope.py:smoke", "base"),
    ("jsonl.train", "", "jsonl"), ("jsonl.train", "{tmp}/missing.jsonl", "jsonl"),
    ("jsonl.train", "{tmp}/empty", "jsonl"),
    ("jsonl.eval", "{tmp}/missing.jsonl", "jsonl"),
    ("jsonl.labels", "a,,b", "jsonl"), ("jsonl.labels", "a,a", "jsonl"),
    ("jsonl.max_len", 1, "jsonl"),
    ("jsonl.add_eos", "true", "jsonl"),
    ("jsonl.max_train", -1, "jsonl"),
    ("jsonl.max_eval", -1, "jsonl"),
    ("jsonl.eval_batch", 0, "jsonl"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    (d / "file.txt").write_text("not a directory\n")
    (d / "empty").mkdir()
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    for name in ("train", "eval"):
        (d / f"{name}.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return d


def _fill(value, tmp: Path):
    return value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value


def _config(context: str, tmp: Path, **changes) -> ml_collections.ConfigDict:
    """base.py's config under a context, with `changes` set as plain values (no type casting,
    as a sweep or a caller's code could set them)."""
    flat = {**CONTEXTS[context], **changes}
    d = base.get_config().to_dict()
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = _fill(value, tmp)
    return ml_collections.ConfigDict(d)


def test_every_constrained_field_has_an_invalid_case():
    covered = {field for field, _, _ in BAD}
    assert covered <= FIELDS.keys(), covered - FIELDS.keys()
    missing = [n for n, f in FIELDS.items() if n not in covered and f.rule.text not in UNCONSTRAINED]
    assert not missing, f"list an invalid value in BAD for: {missing}"
    assert FIELDS.keys() == _leaves(base.get_config().to_dict())  # each field declared with a rule


def _leaves(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_each_context_alone_is_valid(tmp, tmp_path, context):
    check_config(_config(context, tmp), str(tmp_path / "run"))


@pytest.mark.parametrize("field, value, context", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_an_invalid_value_is_one_line_naming_the_field_and_nothing_is_written(tmp, tmp_path, field,
                                                                              value, context):
    value = _fill(value, tmp)
    with pytest.raises(LoraError) as info:
        train_and_evaluate(_config(context, tmp, **{field: value}), str(tmp_path / "run"))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{field}={value!r}"), message
    assert not (tmp_path / "run").exists()


def test_unknown_and_missing_fields_are_named(tmp, tmp_path):
    c = _config("code_search", tmp)
    c.lora.rnak = 8
    with pytest.raises(LoraError, match=r"^lora\.rnak=8: no such config field in base\.py; did you mean "
                                        r"lora\.rank\?$"):
        check_config(c, str(tmp_path / "run"))
    d = base.get_config().to_dict()
    del d["optimizer"]["b2"]
    with pytest.raises(LoraError, match=r"^optimizer\.b2 is missing from the config; base\.py declares"):
        check_config(ml_collections.ConfigDict(d), str(tmp_path / "run"))


def test_workdir_must_be_a_directory_that_can_be_made(tmp, tmp_path):
    good = _config("planted", tmp)
    cases = {str(tmp / "file.txt"): "this is a file", str(tmp / "file.txt" / "run"): "file.txt is a file",
             "": "a directory path"}
    if not os.access("/proc/self", os.W_OK):  # read-only even for root
        cases["/proc/self/run"] = "/proc/self is not writable"
    for workdir, why in cases.items():
        with pytest.raises(LoraError) as info:
            train_and_evaluate(good, workdir)
        assert str(info.value).startswith(f"workdir={workdir!r}; expected a directory") and why in str(
            info.value), info.value
    check_config(good, str(tmp_path / "new" / "nested"))  # makeable: fine, and nothing made
    assert not (tmp_path / "new").exists()


def test_rules_read_their_bounds_types_and_alternatives():
    unit = parse_rule("0 <= float < 1")
    assert [unit.allows(v) for v in (0, 0.5, 1.0, -0.1, math.nan, True, "0.5")] == [
        True, True, False, False, False, False, False]
    assert unit.expected == "a number in [0, 1)"
    mesh = parse_rule("int >= 1 or -1")
    assert [mesh.allows(v) for v in (1, 8, -1, 0, -2, 1.0)] == [True, True, True, False, False, False]
    assert parse_rule('regex or ""').allows("") and not parse_rule("regex").allows("")
    assert parse_rule("lora|full").expected == "one of 'lora', 'full'"
    with pytest.raises(LoraError, match=r"cannot read 'integer'"):
        parse_rule("integer")


def test_a_field_without_a_rule_is_refused_naming_its_line(tmp_path):
    src = tmp_path / "base.py"
    src.write_text("def get_config():\n    c = Config()\n    c.a = 1  # [int]\n    c.b = 2  # no rule\n")
    with pytest.raises(LoraError, match=r"base\.py:4: field b needs one line with \[allowed values\]"):
        declared_fields(src)
    src.write_text("def get_config():\n    c = Config()\n    c.a = 1  # [int >= 0] count\n"
                   "    c.s = ml_collections.ConfigDict()\n    c.s.x = 'k'  # [str] free text\n")
    fields = declared_fields(src)
    assert list(fields) == ["a", "s.x"] and fields["a"].rule.expected == "an integer >= 0"


def _config_modules() -> list[str]:
    files = sorted(ROOT.glob("configs/**/*.py"))
    names = [".".join(f.relative_to(ROOT).with_suffix("").parts) for f in files]
    return [n for n in names if not n.endswith(("__init__", "_common"))]


def _made(module: str, arg: str | None) -> ml_collections.ConfigDict:
    m = importlib.import_module(module)
    if not inspect.signature(m.get_config).parameters:  # base.py: its variant applies to it
        return base.variant(m.get_config(), arg)
    return m.get_config(arg)


@pytest.mark.parametrize("module", _config_modules())
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_config_file_passes(tmp, tmp_path, monkeypatch, module, arg):
    """With the inputs its docstring asks the user for: the jsonl files, a decoder for sft, and
    the pretrained causal_lm base (made first by experiments.pretrain)."""
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "cache"))
    made = _made(module, arg)
    runs = [made] if "run" not in made else [apply_overrides(made.run, overrides_of(e)) for e in made.sweep]
    for run in runs:
        if run.task.startswith("jsonl_"):
            run.jsonl.train, run.jsonl.eval = str(tmp / "train.jsonl"), str(tmp / "eval.jsonl")
            run.model.path = run.model.path or str(tmp / "model")
        if run.task == "causal_lm" and run.model.path:
            assert run.model.path.startswith(str(tmp_path / "cache"))
            os.makedirs(run.model.path, exist_ok=True)
            Path(run.model.path, "config.json").write_text("{}")
        check_config(run, str(tmp_path / "run"))


DEFECTS = {  # once: trained anyway (lr, steps, batch), or a traceback (log_every, dtype, workdir)
    "lr": (["--config.optimizer.lr=-0.001"], r"optimizer\.lr=-0\.001; expected a number > 0"),
    "steps": (["--config.steps=-5"], r"steps=-5; expected an integer >= 0"),
    "batch": (["--config.batch_size=0"], r"batch_size=0; expected an integer >= 1"),
    "log_every": (["--config.log_every=0"], r"log_every=0; expected an integer >= 1"),
    "dtype": (["--config.model.dtype=float64"], r"model\.dtype='float64'; expected one of 'float32', "
                                                 r"'bfloat16'"),
    "workdir": ([], r"workdir='.*file\.txt'; expected a directory, new or a run's to "
                           r"resume \(this is a file\)"),
}


def test_the_cli_refuses_each_old_defect_with_one_line_exit_1_and_no_workdir(tmp, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {}
    for name, (args, _) in DEFECTS.items():  # all at once: each is a process start and an import
        workdir = tmp / "file.txt" if name == "workdir" else tmp_path / name
        cmd = [sys.executable, "-m", "experiments.train", "--config=configs/planted.py",
               f"--workdir={workdir}", *args]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 1, (name, err[-2000:])
        assert len(lines) == 1 and re.fullmatch(r"error: " + DEFECTS[name][1], lines[0]), (name, err[-2000:])
        assert "Traceback" not in err and "done:" not in out
        if name != "workdir":
            assert not (tmp_path / name).exists()
    assert (tmp / "file.txt").read_text() == "not a directory\n"
