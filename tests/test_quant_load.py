"""lora_jax.models.load with quantised weights: quant= quantises each linear kernel as it is read
(the codes of quantize() on the dense weight, one dense kernel alive at a time), and checkpoints
transformers quantised with bitsandbytes load bit for bit as bitsandbytes dequantises them; a
layout that is not bitsandbytes' is one LoraError naming the tensor."""

import dataclasses
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_quant import bits

import lora_jax.models as models
import lora_jax.quant as quant
from lora_jax.errors import LoraError
from lora_jax.models.checkpoint import SafetensorsDir
from lora_jax.models.loading import param_shapes
from lora_jax.models.quantized import quantize_jit
from lora_jax.paths import flat_paths
from lora_jax.quant import torch_mean

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def leaves(params):
    return dict(flat_paths(params, is_leaf=quant.is_quantized))


def assert_same_leaf(a, b, path):
    assert type(a) is type(b), path
    if quant.is_quantized(a):
        assert (a.shape, a.dtype, a.kind, a.blocksize, a.transpose) == (b.shape, b.dtype, b.kind, b.blocksize,
                                                                          b.transpose), path
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=path)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A random tiny Llama checkpoint in Hugging Face's layout (no torch needed)."""
    directory = tmp_path_factory.mktemp("plain")
    rng = np.random.default_rng(3)
    tensors = {}
    for path, s in flat_paths(param_shapes(models.build_module(TINY)[1])):
        key, transposed = models.flax_to_hf(path)
        w = (rng.standard_normal(s.shape) * rng.uniform(0.01, 0.1)).astype(np.float32)
        tensors[key] = np.ascontiguousarray(w.T if transposed else w)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**TINY, "torch_dtype": "float32"}))
    return directory


@pytest.fixture(scope="module")
def lanes():
    """quantize's offset sums in torch's CPU order, which has 16 lanes on AVX-512 machines."""
    torch = pytest.importorskip("torch", reason="the bitsandbytes parity tests need torch")
    saved = torch_mean.SUM_LANES
    torch_mean.SUM_LANES = 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8
    yield
    torch_mean.SUM_LANES = saved


@pytest.fixture(scope="module")
def hf_quantized(plain_dir, tmp_path_factory, lanes):
    """transformers' own 4-bit NF4 (double-quantised) and LLM.int8 models of plain_dir, on CPU,
    each saved with save_pretrained: {"nf4": (model, dir), "int8": (model, dir)}."""
    pytest.importorskip("bitsandbytes", reason="the parity tests need bitsandbytes (the parity extra)")
    transformers = pytest.importorskip("transformers")
    import torch

    torch._dynamo.config.disable = True  # bnb's compiled CPU dequantiser: slow to compile, same math
    configs = {"nf4": transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True),
               "int8": transformers.BitsAndBytesConfig(load_in_8bit=True)}
    out = {}
    for kind, config in configs.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(plain_dir), quantization_config=config, device_map="cpu")
        out[kind] = model, tmp_path_factory.mktemp(kind)
        model.save_pretrained(str(out[kind][1]))
    yield out
    torch._dynamo.config.disable = False


@pytest.mark.parametrize("kind", quant.KINDS)
def test_quant_on_load_gives_the_codes_of_quantize_on_the_dense_weight(plain_dir, kind):
    dense = leaves(models.load(plain_dir).params)
    loaded = leaves(models.load(plain_dir, quant=kind).params)
    assert loaded.keys() == dense.keys()
    for path, leaf in loaded.items():
        linear = path.split("/")[-2] in LINEARS
        assert quant.is_quantized(leaf) == linear, path  # lm_head, embeddings and norms stay dense
        want = quantize_jit(dense[path], kind=kind, transpose=True) if linear else dense[path]
        assert_same_leaf(leaf, want, path)


def test_quant_on_load_keeps_one_dense_kernel_alive_at_a_time(plain_dir, monkeypatch):
    read = SafetensorsDir.read
    alive: list[weakref.ref] = []

    def reading(self, path, shape, dtype, sharding):
        assert all(ref() is None for ref in alive), f"a dense kernel is still held when {path} is read"
        out = read(self, path, shape, dtype, sharding)
        if path.split("/")[-2] in LINEARS:
            alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(SafetensorsDir, "read", reading)
    models.load(plain_dir, quant="nf4")
    assert len(alive) == 2 * len(LINEARS)


@pytest.mark.parity
def test_transformers_nf4_checkpoint_dequantises_as_bitsandbytes(hf_quantized):
    import bitsandbytes.functional as F

    model, directory = hf_quantized["nf4"]
    loaded = leaves(models.load(directory).params)
    dequantize = jax.jit(quant.dequantize)
    stored = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        path = models.hf_to_flax(name + ".weight")[0]
        q = loaded[path]
        assert (q.kind, q.blocksize, q.double_quant, q.dtype) == ("nf4", 64, True, "float32")
        theirs = F.dequantize_4bit(module.weight.data, module.weight.quant_state).numpy().T
        np.testing.assert_array_equal(bits(dequantize(q)), bits(theirs), err_msg=path)
        stored += 1
    assert stored == 2 * len(LINEARS)
    np.testing.assert_array_equal(loaded["params/model/embed_tokens/embedding"],
                                  model.model.embed_tokens.weight.detach().numpy())


@pytest.mark.parity
def test_transformers_nf4_checkpoint_holds_what_quant_on_load_computes(hf_quantized, plain_dir):
    _, directory = hf_quantized["nf4"]
    theirs = leaves(models.load(directory).params)
    ours = leaves(models.load(plain_dir, quant="nf4").params)
    assert theirs.keys() == ours.keys()
    for path in ours:
        assert_same_leaf(ours[path], theirs[path], path)


@pytest.mark.parity
def test_transformers_int8_checkpoint_dequantises_as_bitsandbytes(hf_quantized):
    import bitsandbytes.functional as F

    model, directory = hf_quantized["int8"]
    loaded = leaves(models.load(directory).params)
    w = model.model.layers[1].mlp.down_proj.weight
    q = loaded["params/model/layers_1/mlp/down_proj/kernel"]
    assert (q.kind, q.shape, q.dtype) == ("int8", (128, 64), "float32")
    theirs = F.int8_vectorwise_dequant(w.data, w.SCB).numpy().T
    np.testing.assert_array_equal(bits(quant.dequantize(q)), bits(theirs))


def _state(tensors, key=Q_PROJ, kind="nf4"):
    return json.loads(tensors[f"{key}.quant_state.bitsandbytes__{kind}"].tobytes())


def _set_state(tensors, **fields):
    state = {**_state(tensors), **fields}
    tensors[f"{Q_PROJ}.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8)


def _rename(tensors, old, new):
    tensors[new] = tensors.pop(old)


BROKEN = {  # how the layout is broken -> (edit of the checkpoint's tensors, the tensor named)
    "unknown part": (lambda t: t.update({f"{Q_PROJ}.absmax2": t[f"{Q_PROJ}.absmax"]}), f"{Q_PROJ}.absmax2"),
    "unknown state": (lambda t: _rename(t, f"{Q_PROJ}.quant_state.bitsandbytes__nf4",
                                        f"{Q_PROJ}.quant_state.bitsandbytes__nf5"),
                      f"{Q_PROJ}.quant_state.bitsandbytes__nf5"),
    "bad blocksize": (lambda t: _set_state(t, blocksize=63), f"{Q_PROJ}.quant_state.bitsandbytes__nf4"),
    "extra field": (lambda t: _set_state(t, zero_point=0), f"{Q_PROJ}.quant_state.bitsandbytes__nf4"),
    "not json": (lambda t: t.update({f"{Q_PROJ}.quant_state.bitsandbytes__nf4": np.full(4, 255, np.uint8)}),
                 f"{Q_PROJ}.quant_state.bitsandbytes__nf4"),
    "custom code table": (lambda t: t[f"{Q_PROJ}.quant_map"].__setitem__(3, 0.5), f"{Q_PROJ}.quant_map"),
    "missing nested": (lambda t: t.pop(f"{Q_PROJ}.nested_absmax"), f"{Q_PROJ}.nested_absmax"),
    "absmax dtype": (lambda t: t.update({f"{Q_PROJ}.absmax": t[f"{Q_PROJ}.absmax"].astype(np.float32)}),
                     f"{Q_PROJ}.absmax"),
    "packed shape": (lambda t: t.update({Q_PROJ: t[Q_PROJ][:-1]}), Q_PROJ),
    "quantised norm": (lambda t: t.update({"model.norm.weight.absmax": t[f"{Q_PROJ}.absmax"]}),
                       "model.norm.weight"),
}


@pytest.mark.parity
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_layout_not_bitsandbytes_is_one_error_naming_the_tensor(hf_quantized, tmp_path, broken):
    _, directory = hf_quantized["nf4"]
    tensors = load_file(str(directory / "model.safetensors"))
    edit, key = BROKEN[broken]
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(LoraError) as e:
        models.load(tmp_path)
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parity
def test_a_stored_kind_is_not_quantised_again(hf_quantized):
    _, directory = hf_quantized["nf4"]
    assert leaves(models.load(directory, quant="nf4").params)  # the stored kind: read as stored
    with pytest.raises(LoraError, match=r"\.weight' is stored as nf4; quant='fp4' would quantise it again"):
        models.load(directory, quant="fp4")


@pytest.mark.parametrize("stored", [False, True], ids=["quant-on-load", "bnb-4bit"])
def test_scanned_layers_hold_each_layer_as_loaded_unscanned(plain_dir, hf_quantized, stored):
    """scan_layers=True: each layer quantised (or read) on its own, stacked on a leading axis."""
    directory = hf_quantized["nf4"][1] if stored else plain_dir
    kind = None if stored else "nf4"
    flat = leaves(models.load(directory, quant=kind).params)
    scanned = leaves(models.load(directory, quant=kind, scan_layers=True).params)
    stacks = [p for p, x in scanned.items() if quant.is_quantized(x)]
    assert len(stacks) == len(LINEARS)
    for path in stacks:
        q = scanned[path]
        assert q.stack_axes == 1 and q.shape[0] == TINY["num_hidden_layers"]
        for i in range(q.shape[0]):
            layer = jax.tree.map(lambda x, i=i: x[i], q)
            layer = dataclasses.replace(layer, shape=q.shape[1:], stack_axes=0)
            assert_same_leaf(layer, flat[models.unstack_path(path, i)], path)


def test_quant_refusals(plain_dir):
    with pytest.raises(LoraError, match=r"quant='int4'; expected None or one of nf4, fp4, int8"):
        models.load(plain_dir, quant="int4")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    with pytest.raises(LoraError, match="/kernel' is quantised, and quantised weights are replicated"):
        models.load(plain_dir, quant="nf4", shardings=lambda path, shape: split)
    gptq = json.loads((plain_dir / "config.json").read_text())
    gptq["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (plain_dir / "config.json").write_text(json.dumps(gptq))
    try:
        with pytest.raises(LoraError, match="quant_method is 'gptq'"):
            models.load(plain_dir)
    finally:
        gptq.pop("quantization_config")
        (plain_dir / "config.json").write_text(json.dumps(gptq))


def test_replicated_shardings_place_every_quantised_array(plain_dir):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    q = models.load(plain_dir, quant="nf4", shardings=lambda path, shape: replicated).params
    kernel = q["params"]["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    for x in jax.tree.leaves(kernel):
        assert x.sharding.is_equivalent_to(replicated, x.ndim)
    assert jnp.asarray(quant.dequantize(kernel)).shape == (64, 128)


@pytest.mark.parity
def test_peft_adapter_on_the_nf4_checkpoint_gives_peftmodel_logits(hf_quantized, tmp_path):
    """QLoRA inference: a PEFT adapter over transformers' 4-bit model vs lora_jax.apply over the
    same checkpoint loaded quantised (dequantised in the matmuls)."""
    import peft
    import torch

    from lora_jax import apply
    from lora_jax.peft import load_adapter

    model, directory = hf_quantized["nf4"]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(model, config).eval()
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ids = np.random.default_rng(0).integers(2, 256, size=(2, 10)).astype(np.int32)
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
        with theirs.disable_adapter():
            base = theirs(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    theirs.unload()  # the shared fixture's model without the adapter again
    ours = models.load(directory)
    # load_adapter reads only the weights' shapes (it walks QuantizedWeight leaves as arrays)
    shapes = dataclasses.replace(ours, params=jax.eval_shape(quant.dequantize_params, ours.params))
    adapters = load_adapter(str(tmp_path / "adapter"), shapes)
    logits = np.asarray(jax.jit(lambda p, a, x: apply(ours.fn, p, a, x))(ours.params, adapters, ids))
    assert np.abs(expected - base).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)  # fp32 throughout, fixed once
