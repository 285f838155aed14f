"""The MindSpore PixArt DiT reproduces diffusers' PixArtTransformer2DModel on the same weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import mindspore as ms
from diffusers import PixArtTransformer2DModel

from pixart.models.pixart import PixArt, build_pixart
from pixart.models.pixart_weights import diffusers_to_original, from_pretrained, load_pixart_state, save_pixart_ckpt
from pixart.utils.checkpoint import load_into_cell, read_state_dict
from pixart.utils.errors import CheckpointError, ConfigError
from tiny_models import tiny_pixart, tiny_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS, HEAD_DIM, CAPTION, TOKENS = 2, 8, 12, 6


def tiny_diffusers(interpolation_scale=1.0, sample_size=8, micro=False, seed=0, heads=HEADS):
    """The tiny diffusers DiT these tests compare against (tiny_models.tiny_transformer)."""
    return tiny_transformer(sample_size, micro, seed, CAPTION, heads=heads, head_dim=HEAD_DIM,
                            interpolation_scale=interpolation_scale)


def inputs(batch=2, h=8, w=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, h, w)).astype(np.float32)
    t = np.array([999, 17, 500, 3][:batch], np.int64)
    y = rng.standard_normal((batch, TOKENS, CAPTION)).astype(np.float32)
    mask = np.ones((batch, TOKENS), np.int64)
    mask[0, 2:] = 0  # first prompt is 2 tokens long, the second uses all
    if batch > 2:
        mask[2, 4:] = 0
    return x, t, y, mask


def torch_forward(model, x, t, y, mask, added=None):
    with torch.no_grad():
        out = model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(y), timestep=torch.from_numpy(t),
                    encoder_attention_mask=torch.from_numpy(mask), added_cond_kwargs=added, return_dict=False)[0]
    return out.numpy()


def ms_forward(model, x, t, y, mask, **kw):
    kw = {k: ms.Tensor(v) for k, v in kw.items()}
    return model(ms.Tensor(x), ms.Tensor(t), ms.Tensor(y), ms.Tensor(mask), **kw).asnumpy()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "transformer"
    tiny_diffusers().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("h,w", [(8, 8), (8, 12), (12, 6)])
def test_square_and_non_square_match_diffusers(diffusers_folder, h, w):
    ref_model = PixArtTransformer2DModel.from_pretrained(diffusers_folder).eval()
    model = from_pretrained(diffusers_folder)
    x, t, y, mask = inputs(h=h, w=w)
    ref = torch_forward(ref_model, x, t, y, mask)
    out = ms_forward(model, x, t, y, mask)
    assert out.shape == (2, 8, h, w)
    assert np.abs(ref).mean() > 0.1  # a real signal, not zeros
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_loaded_weights_use_the_file_pages_yet_models_never_share_or_write_them(diffusers_folder):
    """from_pretrained adopts the file's copy-on-write pages (no 2.4 GB copy for XL-2): a weight
    is a view of a private map; a second model from the same file gets its own, a write to one
    model reaches neither the other nor the file, and the weights outlive every loader object."""
    import gc

    weights = os.path.join(diffusers_folder, "diffusion_pytorch_model.safetensors")
    before = open(weights, "rb").read()
    first, second = from_pretrained(diffusers_folder), from_pretrained(diffusers_folder)
    gc.collect()
    name = "blocks.0.mlp.fc1.weight"  # a weight stored as is (not a fused q/k/v)
    param = dict(first.parameters_and_names())[name]
    address = param.asnumpy().ctypes.data
    with open("/proc/self/maps") as f:  # lines "start-end perms offset dev inode path"
        mapped = [line.split()[0].split("-") for line in f if line.rstrip().endswith(os.path.realpath(weights))]
    assert any(int(lo, 16) <= address < int(hi, 16) for lo, hi in mapped)  # the file's pages, uncopied
    expected = param.asnumpy().copy()
    ms.ops.assign(param, ms.Tensor(np.zeros(param.shape, np.float32)))
    assert not param.asnumpy().any()
    np.testing.assert_array_equal(dict(second.parameters_and_names())[name].asnumpy(), expected)
    assert open(weights, "rb").read() == before
    x, t, y, mask = inputs()
    ref = torch_forward(PixArtTransformer2DModel.from_pretrained(diffusers_folder).eval(), x, t, y, mask)
    np.testing.assert_allclose(ms_forward(second, x, t, y, mask), ref, atol=1e-5, rtol=0)


def test_text_mask_is_honoured(diffusers_folder):
    """Padding tokens change nothing; different masks give different outputs for the same input."""
    model = from_pretrained(diffusers_folder)
    x, t, y, mask = inputs(batch=3)
    out = ms_forward(model, x, t, y, mask)
    y2 = y.copy()
    y2[0, 2:] += 5.0  # only padded tokens of sample 0 change
    np.testing.assert_allclose(ms_forward(model, x, t, y2, mask)[0], out[0], atol=1e-5)
    ref = torch_forward(PixArtTransformer2DModel.from_pretrained(diffusers_folder).eval(), x, t, y, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_interpolation_scales(tmp_path, scale):
    ref_model = tiny_diffusers(interpolation_scale=scale, seed=3)
    ref_model.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    assert model.pe_interpolation == scale
    x, t, y, mask = inputs(h=8, w=16)
    np.testing.assert_allclose(ms_forward(model, x, t, y, mask), torch_forward(ref_model, x, t, y, mask),
                               atol=1e-5, rtol=0)


def test_micro_conditions_match_diffusers(tmp_path):
    """PixArt-α 1024-MS: image size and aspect ratio embedded and added to the timestep."""
    # hidden 24: the size embedders take hidden/3 each (2 sizes + 1 ratio = hidden)
    ref_model = tiny_diffusers(sample_size=16, interpolation_scale=2.0, micro=True, seed=4, heads=3)
    ref_model.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    assert model.micro_condition
    x, t, y, mask = inputs(h=16, w=8)
    resolution = np.array([[1024.0, 512.0], [1024.0, 512.0]], np.float32)
    ratio = np.array([[2.0], [2.0]], np.float32)
    ref = torch_forward(ref_model, x, t, y, mask,
                        added={"resolution": torch.from_numpy(resolution), "aspect_ratio": torch.from_numpy(ratio)})
    out = ms_forward(model, x, t, y, mask, resolution=resolution, aspect_ratio=ratio)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_official_calling_convention_tiles_per_prompt_inputs(tmp_path, mode):
    """Code ported from the official sampler passes 2B latents and captions (unconditional and
    conditional) with B rows of mask / img_hw / aspect_ratio: they are tiled as the official model
    does; a row count that does not divide the batch is a one-line error."""
    ref_model = tiny_diffusers(sample_size=16, interpolation_scale=2.0, micro=True, seed=4, heads=3)
    ref_model.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    x, t, y, mask = inputs(batch=4, h=16, w=8)
    half_mask = mask[:2]
    resolution = np.array([[1024.0, 512.0], [512.0, 1024.0]], np.float32)
    ratio = np.array([[2.0], [0.5]], np.float32)
    tiled = dict(resolution=np.tile(resolution, (2, 1)), aspect_ratio=np.tile(ratio, (2, 1)))
    # diffusers in float64: the exact answer. Against diffusers fp32 the two fp32 roundings add up
    # (measured 1.07e-5 on an AVX2 CPU, outputs up to 5.1: ours 6.6e-6 and torch fp32 4.7e-6 off float64).
    ref = torch_forward(ref_model.double(), x.astype(np.float64), t, y.astype(np.float64), np.tile(half_mask, (2, 1)),
                        added={k: torch.from_numpy(v).double() for k, v in tiled.items()})
    ms.set_context(mode=mode)
    out = ms_forward(model, x, t, y, half_mask, resolution=resolution, aspect_ratio=ratio)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out, ms_forward(model, x, t, y, np.tile(half_mask, (2, 1)), **tiled))
    if mode == ms.PYNATIVE_MODE:
        with pytest.raises(ValueError, match=r"^PixArt got 4 latents but 3 rows of mask; give 4 rows") as err:
            ms_forward(model, x, t, y, mask[:3], **tiled)
        assert "\n" not in str(err.value)


def test_graph_mode_equals_pynative(diffusers_folder):
    model = from_pretrained(diffusers_folder)
    x, t, y, mask = inputs(h=8, w=12)
    eager = ms_forward(model, x, t, y, mask)
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = ms_forward(model, x, t, y, mask)
    np.testing.assert_allclose(graph, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_text_context_computed_once_gives_the_same_prediction(diffusers_folder, mode):
    """Samplers pass the blocks' caption K/V (``text_context``, computed once per prompt, eagerly, as
    the pipeline does) instead of the T5 features at every step: the same prediction."""
    model = from_pretrained(diffusers_folder)
    x, t, y, mask = inputs(h=8, w=12)
    context = model.text_context(ms.Tensor(y))
    assert len(context) == len(model.blocks)
    assert [tuple(a.shape) for a in context[0]] == [(2, TOKENS, HEADS * HEAD_DIM)] * 2
    ms.set_context(mode=mode)
    features = ms_forward(model, x, t, y, mask)
    cached = model(ms.Tensor(x), ms.Tensor(t), context, ms.Tensor(mask)).asnumpy()
    np.testing.assert_array_equal(cached, features)
    assert np.abs(features - ms_forward(model, x, t, y[::-1].copy(), mask)).max() > 1e-2  # the text matters



def _count_parses(monkeypatch):
    """{function qualname: times MindSpore's graph parser read it}, filled as graphs compile."""
    from mindspore._extends.parse import parser

    counts, parse = {}, parser.Parser.__init__

    def counting(self, fn, *args, **kwargs):
        parse(self, fn, *args, **kwargs)
        counts[self.function_name] = counts.get(self.function_name, 0) + 1

    monkeypatch.setattr(parser.Parser, "__init__", counting)
    return counts


def test_blocks_compiled_once_per_structure_bitwise(monkeypatch):
    """``compile_blocks_once``: graph mode parses a block structure once (not once per block) and the
    prediction is bitwise unchanged; a block with a LoRA is another structure with its own graph
    (MindSpore shares by the key alone, so a wrong key would run the wrong block)."""
    from pixart.models.lora import inject_lora
    from pixart.models.pixart import compile_blocks_once

    def model():
        m = tiny_pixart(random_seed=3, depth=4)
        inject_lora(m, 2, target_modules=["blocks.0.attn.qkv"])
        for name, param in m.parameters_and_names():
            if "lora_B" in name:  # B starts at zero: make the adapter change the output
                param.set_data(ms.Tensor(np.full(param.shape, 0.5, np.float32)))
        m.set_train(False)
        return m

    x, t, _, _ = inputs(h=8, w=12)
    y = np.random.default_rng(4).standard_normal((2, 120, 8)).astype(np.float32)
    mask = np.ones((2, 120), np.int64)
    mask[0, 7:] = 0
    counts = _count_parses(monkeypatch)
    ms.set_context(mode=ms.GRAPH_MODE)
    separate = ms_forward(model(), x, t, y, mask)
    assert counts["PixArtBlock.construct"] == 4
    counts.clear()
    shared_model = model()
    compile_blocks_once(shared_model)
    keys = [block.cell_init_args for block in shared_model.blocks]
    assert keys[0] != keys[1] and keys[1] == keys[2] == keys[3]
    shared = ms_forward(shared_model, x, t, y, mask)
    assert counts["PixArtBlock.construct"] <= 2  # once per structure (less if an earlier test parsed one)
    np.testing.assert_array_equal(shared, separate)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert np.abs(ms_forward(tiny_pixart(random_seed=3, depth=4), x, t, y, mask) - separate).max() > 1e-3


def test_structure_key_follows_what_a_block_computes():
    from pixart.models.layers import structure_key
    from pixart.models.lora import inject_lora
    from pixart.ops import cpu_kernels

    model = tiny_pixart(depth=3)
    first = structure_key(model.blocks[0])
    assert structure_key(model.blocks[1]) == first  # other weights, same function
    model.blocks[2].set_train(True)
    assert structure_key(model.blocks[2]) != first  # mode
    model.blocks[2].set_train(False)
    model.blocks[1].attn.backend = "flash"
    assert structure_key(model.blocks[1]) != first  # a setting
    model.blocks[1].attn.backend = model.blocks[0].attn.backend
    model.blocks[1].scale_shift_table.set_dtype(ms.float16)
    assert structure_key(model.blocks[1]) != first  # a dtype
    inject_lora(model, 2, target_modules=["blocks.2.mlp.fc1"])
    assert structure_key(model.blocks[2]) != structure_key(model.blocks[0])  # a layer swapped deeper down
    before = structure_key(model.blocks[0])
    cpu_kernels.use_fused_attention(model)
    assert structure_key(model.blocks[0]) != before

def test_text_context_refuses_caption_dropout(diffusers_folder):
    model = from_pretrained(diffusers_folder)
    x, t, y, mask = inputs()
    with pytest.raises(ValueError, match="drop_ids"):
        model(ms.Tensor(x), ms.Tensor(t), model.text_context(ms.Tensor(y)), ms.Tensor(mask),
              drop_ids=ms.Tensor(np.array([True, False])))


def original_pth(folder, path, wrapper="state_dict"):
    """Write diffusers weights as an original-layout .pth with a pos_embed buffer.

    ``wrapper="official"`` writes what the official PixArt ``save_checkpoint`` writes during
    training: {state_dict, state_dict_ema, optimizer, scheduler, epoch}, the EMA weights being the
    diffusers weights and ``state_dict`` a perturbed copy (so loading the wrong one shows).
    Returns the original-layout tensors.
    """
    state = read_state_dict(folder)
    original = {k: torch.from_numpy(np.array(v)) for k, v in diffusers_to_original(state).items()}
    original["pos_embed"] = torch.zeros(1, 16, HEADS * HEAD_DIM)
    original["y_embedder.y_embedding"] = torch.randn(TOKENS, CAPTION)
    if wrapper == "official":
        trained = {k: v + 0.05 for k, v in original.items()}
        optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                     "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999), "params": [0]}]}
        torch.save({"state_dict": trained, "state_dict_ema": original, "optimizer": optimizer,
                    "scheduler": {"last_epoch": 3, "_step_count": 4}, "epoch": 3}, path)
    else:
        torch.save({wrapper: original} if wrapper else original, path)
    return original


@pytest.mark.parametrize("wrapper", ["state_dict", "official", None])
def test_original_pth_loads_and_matches(diffusers_folder, tmp_path, wrapper):
    path = str(tmp_path / "PixArt-Sigma-XL-2-512-MS.pth")
    original_pth(diffusers_folder, path, wrapper)
    model = from_pretrained(path, use_ema=wrapper == "official", num_heads=HEADS, input_size=8, pe_interpolation=1.0)
    x, t, y, mask = inputs(h=8, w=12)
    ref = torch_forward(PixArtTransformer2DModel.from_pretrained(diffusers_folder).eval(), x, t, y, mask)
    np.testing.assert_allclose(ms_forward(model, x, t, y, mask), ref, atol=1e-5, rtol=0)


def test_official_training_checkpoint_ema(diffusers_folder, tmp_path):
    """state_dict_ema is what --use_ema reads; without --use_ema it is state_dict; a checkpoint
    without EMA weights refuses --use_ema in one line naming its keys."""
    path = str(tmp_path / "epoch_3_step_300.pth")
    original = original_pth(diffusers_folder, path, "official")
    ema, _ = load_pixart_state(path, use_ema=True)
    trained, _ = load_pixart_state(path)
    for name, value in original.items():
        if name != "pos_embed":
            np.testing.assert_array_equal(ema[name], value.numpy())
            np.testing.assert_array_equal(trained[name], value.numpy() + np.float32(0.05))
    plain = str(tmp_path / "no_ema.pth")
    torch.save({"state_dict": original, "optimizer": {}, "scheduler": {}, "epoch": 1}, plain)
    with pytest.raises(CheckpointError) as err:
        load_pixart_state(plain, use_ema=True)
    message = str(err.value)
    assert "\n" not in message and "no EMA weights" in message
    assert "it holds: state_dict, optimizer, scheduler, epoch" in message
    result = run_convert("--source", plain, "--target", str(tmp_path / "x.ckpt"), "--use_ema")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no EMA weights" in result.stderr


def run_convert(*args):
    # PYTHONPATH: tools/convert.py must import this checkout's package, not an installed one
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env)


def test_convert_pth_to_ckpt_to_diffusers_and_back_is_exact(diffusers_folder, tmp_path):
    pth = str(tmp_path / "PixArt-Sigma-XL-2-512-MS.pth")
    original_pth(diffusers_folder, pth)
    ckpt, back, folder = str(tmp_path / "m.ckpt"), str(tmp_path / "back.ckpt"), str(tmp_path / "diffusers")
    for args in (["--source", pth, "--target", ckpt, "--num_heads", str(HEADS)],
                 ["--source", ckpt, "--target", folder, "--to", "diffusers"],
                 ["--source", folder, "--target", back]):
        result = run_convert(*args)
        assert result.returncode == 0, result.stderr
    first, _ = load_pixart_state(ckpt)
    assert "pos_embed" not in first and "y_embedder.y_embedding" in first  # buffer dropped, null caption kept
    second, config = load_pixart_state(back)
    assert config["input_size"] == 64 and config["pe_interpolation"] == 1.0  # 512 from the file name
    from tools.convert import image_size_from_name
    assert [image_size_from_name(n) for n in ("PixArt-Sigma-XL-2-256x256.pth", "PixArt-Sigma-XL-2-1024-MS.pth",
                                              "PixArt-Sigma-XL-2-2K-MS.pth", "PixArt-XL-2-512x512.pth", "x.pth")] \
        == [256, 1024, 2048, 512, None]
    assert set(second) == set(first) - {"y_embedder.y_embedding"}
    for k in second:
        np.testing.assert_array_equal(second[k], first[k])
    # the diffusers folder written by --to diffusers is loadable by diffusers itself
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["num_layers"] == 2
    ref = PixArtTransformer2DModel.from_pretrained(folder).eval()
    x, t, y, mask = inputs()
    model = from_pretrained(ckpt)  # architecture stored in the .ckpt
    assert model.config.num_heads == HEADS
    np.testing.assert_allclose(ms_forward(model, x, t, y, mask), torch_forward(ref, x, t, y, mask), atol=1e-5, rtol=0)


def _original_pth(folder, path, tokens):
    """diffusers weights as a released original .pth ({"state_dict"}), null caption of ``tokens``."""
    original = {k: torch.from_numpy(np.array(v)) for k, v in diffusers_to_original(read_state_dict(folder)).items()}
    original["y_embedder.y_embedding"] = torch.randn(tokens, CAPTION)
    torch.save({"state_dict": original}, path)


def test_alpha_256_uses_pe_interpolation_1_everywhere(tmp_path):
    """PixArt-α 256: the released diffusers config leaves interpolation_scale unset (diffusers then
    uses 1); tools/convert.py, from_components(image_size=256) and the α 256 config all say 1.0,
    while the Σ 256 model keeps 0.5."""
    import yaml

    from pixart.pipelines.pixart_pipeline import PixArtAlphaPipeline, PixArtSigmaPipeline

    ref_model = tiny_diffusers(sample_size=32, interpolation_scale=None, seed=5)
    ref_model.save_pretrained(tmp_path / "transformer")
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["interpolation_scale"] is None
    x, t, y, mask = inputs(h=32, w=32)
    ref = torch_forward(ref_model, x, t, y, mask)
    assert from_pretrained(str(tmp_path / "transformer")).pe_interpolation == 1.0

    alpha_pth, sigma_pth = tmp_path / "PixArt-XL-2-256x256.pth", tmp_path / "PixArt-Sigma-XL-2-256x256.pth"
    _original_pth(tmp_path / "transformer", alpha_pth, tokens=120)
    _original_pth(tmp_path / "transformer", sigma_pth, tokens=300)
    for pth, expected in ((alpha_pth, 1.0), (sigma_pth, 0.5)):
        result = run_convert("--source", pth, "--target", pth.with_suffix(".ckpt"), "--num_heads", HEADS)
        assert result.returncode == 0, result.stderr
        _, config = load_pixart_state(str(pth.with_suffix(".ckpt")))
        assert (config["input_size"], config["pe_interpolation"]) == (32, expected), pth.name
    alpha = PixArtAlphaPipeline.from_components(str(alpha_pth.with_suffix(".ckpt")), "-", "-", "-",
                                                image_size=256).transformer
    sigma = PixArtSigmaPipeline.from_components(str(sigma_pth.with_suffix(".ckpt")), "-", "-", "-",
                                                image_size=256).transformer
    assert (alpha.pe_interpolation, sigma.pe_interpolation) == (1.0, 0.5)
    np.testing.assert_allclose(ms_forward(alpha, x, t, y, mask), ref, atol=1e-5, rtol=0)
    with open(os.path.join(ROOT, "configs", "inference", "pixart-alpha-256x256.yaml")) as f:
        yaml_config = yaml.safe_load(f)
    assert (yaml_config["version"], yaml_config["image_size"], yaml_config["pe_interpolation"]) == ("alpha", 256, 1.0)
    assert os.path.basename(yaml_config["checkpoint"]) == "PixArt-XL-2-256x256.ckpt"


def test_trained_run_exports_to_original_and_diffusers(diffusers_folder, tmp_path):
    """A run's final/ema.ckpt becomes an official-layout .safetensors (--to original) and a folder
    diffusers' PixArtTransformer2DModel loads (--to diffusers), both giving the run's output."""
    model = from_pretrained(diffusers_folder, model_max_length=TOKENS)
    model.y_embedder.y_embedding.set_data(ms.Tensor(np.random.default_rng(3).standard_normal((TOKENS, CAPTION)),
                                                    ms.float32))
    ckpt = tmp_path / "run" / "final" / "ema.ckpt"
    save_pixart_ckpt(model, str(ckpt), extra={"train_step": "10", "base_model": "x"})  # as train.py's export
    x, t, y, mask = inputs(h=8, w=12)
    expected = ms_forward(model, x, t, y, mask)

    folder, original = tmp_path / "diffusers", tmp_path / "official.safetensors"
    for args in (("--to", "diffusers", "--target", folder), ("--to", "original", "--target", original)):
        result = run_convert("--source", ckpt, *args)
        assert result.returncode == 0, result.stderr
    ref = PixArtTransformer2DModel.from_pretrained(str(folder)).eval()
    np.testing.assert_allclose(torch_forward(ref, x, t, y, mask), expected, atol=1e-5, rtol=0)

    from safetensors.torch import load_file

    tensors = load_file(str(original))
    names = {n for n, _ in model.parameters_and_names()}
    assert set(tensors) == names | {"pos_embed"} and "y_embedder.y_embedding" in tensors
    assert tuple(tensors["pos_embed"].shape) == (1, 16, HEADS * HEAD_DIM)  # the 4×4 base grid's buffer
    np.testing.assert_array_equal(tensors["blocks.1.attn.qkv.weight"].numpy(), model.blocks[1].attn.qkv.weight.asnumpy())
    torch.save({"state_dict": tensors}, tmp_path / "official.pth")  # what the official loaders read
    from_pth = from_pretrained(str(tmp_path / "official.pth"), num_heads=HEADS, input_size=8, pe_interpolation=1.0)
    np.testing.assert_array_equal(ms_forward(from_pth, x, t, y, mask), expected)
    assert from_pretrained(str(original)).config == model.config  # the architecture rides in the metadata


def test_convert_dtype_and_bad_input(diffusers_folder, tmp_path):
    result = run_convert("--source", diffusers_folder, "--target", str(tmp_path / "h.ckpt"), "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    state, _ = load_pixart_state(str(tmp_path / "h.ckpt"))
    assert all(v.dtype == np.float16 for v in state.values())
    missing = run_convert("--source", str(tmp_path / "nope.pth"), "--target", str(tmp_path / "x.ckpt"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_wrong_weights_are_refused_with_a_list(diffusers_folder):
    state, config = load_pixart_state(diffusers_folder)
    model = build_pixart({**config, "depth": 3})
    with pytest.raises(CheckpointError, match=r"16 missing \(y_embedder\.y_embedding, blocks\.2\."):
        load_into_cell(model, state, source="x")
    state["blocks.0.mlp.fc1.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"mis-shaped \(blocks\.0\.mlp\.fc1\.weight \(3, 3\)"):
        load_into_cell(build_pixart(config), state, source="x")


def test_fixed_grid_pixart_rejects_other_sizes(diffusers_folder):
    state, config = load_pixart_state(diffusers_folder)
    model = PixArt(**config)
    x, t, y, mask = inputs(h=8, w=8)
    assert ms_forward(model, x, t, y, mask).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="fixed grid"):
        ms_forward(model, *inputs(h=8, w=12))


# ----------------------------------------------------------------------------- KV compression


def _np_layernorm(x, w, b, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_kv_attention(x, qkv_w, qkv_b, proj_w, proj_b, sr_w, sr_b, nw, nb, heads, gh, gw, mode, s):
    """Independent numpy self-attention with compressed K/V on a gh×gw token grid."""
    n, t, d = x.shape
    qkv = x @ qkv_w.T + qkv_b
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]

    def compress(z):
        grid = z.reshape(n, gh, gw, d)
        if mode == "conv":  # depthwise conv, kernel = stride = s, then affine LayerNorm
            out = np.zeros((n, gh // s, gw // s, d))
            for i in range(gh // s):
                for j in range(gw // s):
                    patch = grid[:, i * s:(i + 1) * s, j * s:(j + 1) * s, :]  # (n, s, s, d)
                    out[:, i, j] = np.einsum("nabd,dab->nd", patch, sr_w[:, 0]) + sr_b
            return _np_layernorm(out.reshape(n, -1, d), nw, nb)
        if mode == "ave":
            return grid[:, 0:(gh // s) * s:s, 0:(gw // s) * s:s].reshape(n, -1, d)
        if mode == "uniform_every":  # every s-th token of the flat sequence
            return z[:, ::s]
        return grid[:, ::s, ::s].reshape(n, -1, d)

    k, v = compress(k), compress(v)
    hd = d // heads
    split = lambda z: z.reshape(n, -1, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(n, t, d)
    return out @ proj_w.T + proj_b, k.shape[1]


@pytest.mark.parametrize("mode,scale,gh,gw", [("conv", 2, 4, 6), ("ave", 2, 4, 6), ("uniform", 2, 6, 4),
                                              ("conv", 3, 6, 3), ("uniform_every", 2, 4, 6),
                                              ("uniform_every", 3, 3, 4)])
def test_kv_compression_matches_numpy(mode, scale, gh, gw):
    model = tiny_pixart(caption_channels=CAPTION, model_max_length=TOKENS,
                        kv_compress_config={"sampling": mode, "scale_factor": scale, "kv_compress_layer": [1]})
    attn = model.blocks[1].attn
    assert model.blocks[0].attn.kv_compress is None and attn.kv_compress == mode
    rng = np.random.default_rng(7)
    for _, p in attn.parameters_and_names():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.5))
    x = rng.standard_normal((2, gh * gw, 16)).astype(np.float32)
    out = attn(ms.Tensor(x), gh, gw).asnumpy()
    get = lambda name: getattr(attn, name).weight.asnumpy() if hasattr(attn, name) else None  # noqa: E731
    bias = lambda name: getattr(attn, name).bias.asnumpy() if hasattr(attn, name) else None  # noqa: E731
    ref, kept = _np_kv_attention(x, get("qkv"), bias("qkv"), get("proj"), bias("proj"), get("sr"), bias("sr"),
                                 get("norm"), bias("norm"), 2, gh, gw, mode, scale)
    assert kept < gh * gw and out.shape == x.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_kv_conv_starts_as_average_and_loads_by_original_names(tmp_path):
    kv = {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1]}
    model = tiny_pixart(caption_channels=CAPTION, model_max_length=TOKENS, kv_compress_config=kv, qk_norm=True)
    np.testing.assert_array_equal(model.blocks[1].attn.sr.weight.asnumpy(), np.full((16, 1, 2, 2), 0.25))
    names = [n for n, _ in model.parameters_and_names()]
    for name in ("blocks.1.attn.sr.weight", "blocks.1.attn.norm.weight", "blocks.1.attn.norm.bias",
                 "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"):
        assert name in names
    for _, p in model.parameters_and_names():
        p.set_data(ms.Tensor(np.random.default_rng(1).standard_normal(p.shape).astype(np.float32) * 0.3))
    save_pixart_ckpt(model, str(tmp_path / "kv.ckpt"))
    loaded = from_pretrained(str(tmp_path / "kv.ckpt"))
    assert loaded.config.kv_compress_config == kv and loaded.config.qk_norm
    x, t, y, mask = inputs(h=8, w=8)
    np.testing.assert_array_equal(ms_forward(loaded, x, t, y, mask), ms_forward(model, x, t, y, mask))


def test_half_precision_parameters_run_on_cpu(diffusers_folder):
    """fp16 weights (really fp16: every parameter): same result as fp32 up to fp16 rounding. bf16
    parameters have no MindSpore CPU kernels: refused in one line (bf16 on CPU is fp32 weights with
    bf16 GEMMs, tests/test_cpu_kernels.py)."""
    ref = ms_forward(from_pretrained(diffusers_folder), *inputs())
    half = from_pretrained(diffusers_folder, dtype=ms.float16)
    assert {p.dtype for p in half.get_parameters()} == {ms.float16}
    out = ms_forward(half, *inputs())
    assert out.dtype == np.float32
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 0.02, rel
    with pytest.raises(ConfigError, match="bf16 parameters have no MindSpore CPU kernels"):
        from_pretrained(diffusers_folder, dtype=ms.bfloat16)
