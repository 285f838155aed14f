"""LoRA adapters on the native PixArt DiT: injection, training, saving only adapters, merging."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import nn

from pixart.models.pixart_weights import from_pretrained, save_pixart_ckpt
from pixart.models.lora import (DEFAULT_TARGETS, LoRADense, inject_lora, load_lora, load_lora_into, lora_modules,
                               lora_state_dict, merge_lora, save_lora, unmerge_lora)
from pixart.utils.checkpoint import read_state_dict
from pixart.utils.errors import CheckpointError, ConfigError
from tiny_models import tiny_pixart

ARCH = dict(hidden_size=32, caption_channels=16, model_max_length=8, pe_interpolation=1.0)


def tiny_model(seed=1, **overrides):
    """A small PixArtMS with every weight random (the PixArt init zeroes the cross-attention and
    output projections, which would hide most of what LoRA changes)."""
    return tiny_pixart(random_seed=seed, **{**ARCH, **overrides})


def inputs(batch=2):
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((batch, 4, 8, 8)).astype(np.float32))
    t = ms.Tensor(np.array([10.0, 600.0][:batch], np.float32))
    y = ms.Tensor(rng.standard_normal((batch, 8, 16)).astype(np.float32))
    mask = ms.Tensor(np.array([[1] * 8, [1] * 3 + [0] * 5][:batch], np.int32))
    return x, t, y, mask


def forward(model):
    return model(*inputs()).asnumpy()


def train_steps(model, params, steps=3, lr=0.05):
    """A few Adam steps on a toy loss; returns the losses."""
    optimizer = nn.Adam(params, learning_rate=lr)
    x, t, y, mask = inputs()
    target = ms.Tensor(np.random.default_rng(5).standard_normal((2, 8, 8, 8)).astype(np.float32))

    def loss_fn():
        return ((model(x, t, y, mask) - target) ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
    losses = []
    for _ in range(steps):
        loss, grads = grad_fn()
        optimizer(grads)
        losses.append(float(loss))
    return losses


def snapshot(model):
    return {name: param.asnumpy().copy() for name, param in model.parameters_and_names()}


def test_injection_keeps_names_freezes_base_and_output():
    model = tiny_model()
    before_out, before = forward(model), snapshot(model)
    params = inject_lora(model, rank=4, alpha=8)

    adapted = list(lora_modules(model))
    assert adapted == [f"blocks.{i}.{t}" for i in range(2) for t in DEFAULT_TARGETS]
    names = [name for name, _ in model.parameters_and_names()]
    # Base parameters keep their names (checkpoints still load); adapters are siblings of them.
    assert [n for n in names if not n.endswith((".lora_A", ".lora_B"))] == list(before)
    assert [p.name for p in params] == [f"{m}.{ab}" for m in adapted for ab in ("lora_A", "lora_B")]
    assert all(param.name == name for name, param in model.parameters_and_names())
    assert [p.name for p in model.trainable_params()] == [p.name for p in params]
    qkv = model.blocks[1].attn.qkv
    assert isinstance(qkv, LoRADense) and qkv.lora_A.shape == (4, 32) and qkv.lora_B.shape == (96, 4)
    assert not qkv.lora_B.asnumpy().any() and np.abs(qkv.lora_A.asnumpy()).max() <= 1 / np.sqrt(32)
    assert qkv.scaling == 2.0
    np.testing.assert_array_equal(forward(model), before_out)  # B = 0: exactly the base model
    # "attn.proj" is the self-attention output only, not cross_attn.proj.
    assert not isinstance(tiny_model().blocks[0].cross_attn.proj, LoRADense)
    other = tiny_model()
    inject_lora(other, 2, target_modules="attn.proj, mlp.fc1")
    assert list(lora_modules(other)) == ["blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.1.attn.proj",
                                         "blocks.1.mlp.fc1"]


def test_training_changes_only_adapters():
    model = tiny_model()
    before = snapshot(model)
    params = inject_lora(model, rank=4)
    base_out = forward(model)
    losses = train_steps(model, params)
    assert losses[-1] < losses[0]
    after = snapshot(model)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert all(after[p.name].any() for p in params if p.name.endswith("lora_B"))  # B moved off zero
    assert np.abs(forward(model) - base_out).max() > 1e-3


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_save_load_merge_equals_adapted_model(tmp_path, suffix):
    base_path = tmp_path / "base.ckpt"
    model = tiny_model()
    save_pixart_ckpt(model, str(base_path))
    params = inject_lora(model, rank=4, alpha=2, dropout=0.1)
    train_steps(model, params)
    model.set_train(False)  # dropout off: the forward to reproduce
    adapted_out = forward(model)

    path = tmp_path / f"lora{suffix}"
    save_lora(model, path, metadata={"base_model": "base.ckpt", "step": 3})
    state, config = load_lora(path)
    assert set(state) == set(lora_state_dict(model)) and all(k.endswith((".lora_A", ".lora_B")) for k in state)
    assert set(read_state_dict(str(path))) - set(state) <= {"lora_config"}  # no base weights in the file
    assert config["rank"] == 4 and config["alpha"] == 2.0 and config["target_modules"] == list(DEFAULT_TARGETS)
    assert config["dropout"] == 0.1 and config["metadata"] == {"base_model": "base.ckpt", "step": 3}
    for name, value in lora_state_dict(model).items():
        np.testing.assert_array_equal(state[name], value)

    # sample.py --lora: a freshly loaded base model, adapters merged into its weights.
    fresh = from_pretrained(str(base_path))
    fresh.set_train(False)
    merged = merge_lora(fresh, path)
    assert len(merged) == 10 and not lora_modules(fresh)
    np.testing.assert_allclose(forward(fresh), adapted_out, rtol=0, atol=1e-5)
    assert np.abs(forward(fresh) - forward(from_pretrained(str(base_path)))).max() > 1e-3
    unmerge_lora(fresh, path)
    base = snapshot(from_pretrained(str(base_path)))
    for name, value in snapshot(fresh).items():
        np.testing.assert_allclose(value, base[name], rtol=0, atol=1e-6, err_msg=name)


def test_merge_strength_state_dict_and_resume():
    model = tiny_model()
    params = inject_lora(model, rank=2)
    train_steps(model, params, steps=2)
    state, config = lora_state_dict(model), dict(model.lora_config)
    half, full = tiny_model(), tiny_model()
    merge_lora(half, state, config=config, strength=0.5)
    merge_lora(full, (state, config))
    w0 = tiny_model().blocks[0].attn.qkv.weight.asnumpy()
    np.testing.assert_allclose(half.blocks[0].attn.qkv.weight.asnumpy() - w0,
                               0.5 * (full.blocks[0].attn.qkv.weight.asnumpy() - w0), atol=1e-6)
    # Resuming LoRA training: adapters load into a freshly injected model.
    resumed = tiny_model()
    inject_lora(resumed, rank=2)
    load_lora_into(resumed, state, config=config)
    model.set_train(False)
    resumed.set_train(False)
    np.testing.assert_array_equal(forward(resumed), forward(model))


def test_mismatches_are_errors_and_change_nothing(tmp_path):
    model = tiny_model()
    inject_lora(model, rank=2, target_modules=["attn.qkv", "mlp.fc2"])
    model.blocks[1].mlp.fc2.lora_B.set_data(ms.Tensor(np.ones((32, 2), np.float32)))
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)

    shallow = tiny_model(depth=1)  # blocks.1 does not exist
    before = snapshot(shallow)
    with pytest.raises(CheckpointError, match="blocks.1.attn.qkv is not a layer"):
        merge_lora(shallow, path)
    for name, value in snapshot(shallow).items():
        np.testing.assert_array_equal(value, before[name])
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.qkv.weight is \(144, 48\)"):
        merge_lora(tiny_model(hidden_size=48), path)
    with pytest.raises(ConfigError, match="without adapters"):
        merge_lora(model, path)
    with pytest.raises(ConfigError, match="inject them once"):
        inject_lora(model, rank=2)
    with pytest.raises(ConfigError, match="match no Dense layer.*blocks.\\*.attn.qkv"):
        inject_lora(tiny_model(), rank=2, target_modules=["attn.qvk"])
    with pytest.raises(ConfigError, match="rank"):
        inject_lora(tiny_model(), rank=0)
    with pytest.raises(CheckpointError, match="rank/alpha"):
        other = tiny_model()
        inject_lora(other, rank=2, alpha=4)
        load_lora_into(other, path)
    full = tmp_path / "full.ckpt"
    save_pixart_ckpt(tiny_model(), str(full))
    with pytest.raises(CheckpointError, match=r"is not a LoRA file this loader knows .*its keys: "):
        load_lora(full)
    with pytest.raises(ConfigError, match=".safetensors or .ckpt"):
        save_lora(model, tmp_path / "lora.pth")


def test_graph_mode_matches_pynative():
    model = tiny_model()
    params = inject_lora(model, rank=4)
    train_steps(model, params, steps=1)  # non-zero B so the adapters matter
    eager = forward(model)
    twin = tiny_model()
    twin_params = inject_lora(twin, rank=4)
    load_lora_into(twin, lora_state_dict(model), config=model.lora_config)
    ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_allclose(forward(model), eager, rtol=0, atol=1e-6)
    graph_losses = train_steps(model, params, steps=2)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    eager_losses = train_steps(twin, twin_params, steps=2)
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-5)
    np.testing.assert_allclose(model.blocks[0].attn.qkv.lora_B.asnumpy(), twin.blocks[0].attn.qkv.lora_B.asnumpy(),
                               rtol=0, atol=1e-5)


def test_adapters_follow_auto_mixed_precision():
    """Under auto_mixed_precision (O2, what train.py uses for half compute) the float32 adapters are
    cast to the compute dtype; the model is unchanged at init and the adapters get finite grads."""
    x, t, y, _ = inputs()  # no text mask: the fp16 padding bias is outside this test's scope
    base = ms.amp.auto_mixed_precision(tiny_model(), "O2", dtype=ms.float16)
    model = tiny_model()
    params = inject_lora(model, rank=4)
    net = ms.amp.auto_mixed_precision(model, "O2", dtype=ms.float16)
    np.testing.assert_array_equal(net(x, t, y).asnumpy(), base(x, t, y).asnumpy())

    def loss_fn():
        return (net(x, t, y) ** 2).mean()

    _, grads = ms.value_and_grad(loss_fn, None, params)()
    assert all(g.dtype == ms.float32 and np.isfinite(g.asnumpy()).all() for g in grads)
    assert all(g.asnumpy().any() for g, p in zip(grads, params) if p.name.endswith("lora_B"))
