"""LoRA files as people share them: peft / diffusers and kohya / OneTrainer layouts load and merge
into the native DiT exactly as peft applies them in diffusers; this project's adapters export to peft."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

import mindspore as ms

from pixart.models.lora import inject_lora, load_lora, lora_modules, merge_lora, save_lora
from pixart.models.pixart_weights import from_pretrained
from pixart.ops.cpu_kernels import use_fused_kernels
from pixart.utils.errors import CheckpointError
from test_pixart_dit import inputs, ms_forward, run_convert, tiny_diffusers, torch_forward

# Every kind of layer: fused q/k (v left out: its rows stay zero), unfused attn2.to_q, the fused
# cross-attention k/v, the MLP, the top-level projections and the patch-embedding convolution.
TARGETS = ["to_q", "to_k", "attn1.to_out.0", "attn2.to_v", "ff.net.0.proj", "ff.net.2", "proj_out",
           "pos_embed.proj", "adaln_single.linear", "caption_projection.linear_1"]
RANK, ALPHA = 4, 8.0
RANK_PATTERN, ALPHA_PATTERN = {"ff.net.2": 2}, {"proj_out": 3.0}


def module_scale(module):
    rank = next((r for k, r in RANK_PATTERN.items() if module.endswith(k)), RANK)
    alpha = next((a for k, a in ALPHA_PATTERN.items() if module.endswith(k)), ALPHA)
    return alpha / rank


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory):
    """A tiny diffusers PixArt with a random peft LoRA: its base folder, the adapted model's output,
    and the adapters written in the three shared layouts."""
    root = tmp_path_factory.mktemp("lora")
    model = tiny_diffusers(seed=11)
    model.save_pretrained(root / "base")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                        alpha_pattern=ALPHA_PATTERN, init_lora_weights=True)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    x, t, y, mask = inputs(h=8, w=12)
    expected = torch_forward(model, x, t, y, mask)  # the peft-adapted diffusers model
    peft_model.save_pretrained(root / "peft")  # adapter_model.safetensors + adapter_config.json

    state = {k.replace("base_model.model.", ""): v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    # diffusers' single-file layout: "transformer." keys, the config in the safetensors metadata
    packed = {f"transformer.{k}": v for k, v in config.to_dict().items() if k in ("r", "lora_alpha", "rank_pattern",
                                                                                    "alpha_pattern", "use_rslora")}
    save_file({f"transformer.{k}": v for k, v in state.items()}, root / "diffusers_lora.safetensors",
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(packed)})
    # kohya / OneTrainer: dots become underscores, lora_down / lora_up / alpha; a text-encoder
    # adapter rides along (skipped: it adapts T5, not the DiT)
    kohya = {}
    for key, value in state.items():
        module, ab = key.rsplit(".lora_", 1)
        name = "lora_transformer_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if ab.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(module_scale(module) * value.shape[0 if ab.startswith("A") else 1])
    kohya["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 32)
    kohya["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, 2)
    kohya["lora_te_encoder_block_0_layer_0_SelfAttention_q.alpha"] = torch.tensor(2.0)
    save_file(kohya, root / "kohya_lora.safetensors")
    return root, expected


@pytest.mark.parametrize("layout", ["peft", "diffusers_lora.safetensors", "kohya_lora.safetensors"])
def test_shared_lora_layouts_merge_to_peft_output(peft_files, layout):
    root, expected = peft_files
    state, config = load_lora(root / layout)
    assert config["converted_from"] == ("kohya" if layout.startswith("kohya") else "peft")
    assert config["skipped"] == (3 if layout.startswith("kohya") else 0)
    # q and k of self-attention become one adapter of the fused qkv (v rows zero), rank 4 + 4
    assert state["blocks.0.attn.qkv.lora_A"].shape == (8, 16) and state["blocks.0.attn.qkv.lora_B"].shape == (48, 8)
    assert not state["blocks.0.attn.qkv.lora_B"][32:].any()
    assert state["blocks.1.mlp.fc2.lora_A"].shape[0] == 2  # rank_pattern
    model = from_pretrained(str(root / "base"))
    merged = merge_lora(model, (state, config))
    assert "x_embedder.proj" in merged and "t_block.1" in merged and not lora_modules(model)
    x, t, y, mask = inputs(h=8, w=12)
    out = ms_forward(model, x, t, y, mask)
    base = ms_forward(from_pretrained(str(root / "base")), x, t, y, mask)
    assert np.abs(expected - base).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_lora_scale_halves_the_update(peft_files):
    root, _ = peft_files
    lora = load_lora(root / "kohya_lora.safetensors")
    full, half = from_pretrained(str(root / "base")), from_pretrained(str(root / "base"))
    merge_lora(full, lora)
    merge_lora(half, lora, strength=0.5)
    base = from_pretrained(str(root / "base"))
    for name in ("blocks.0.attn.qkv.weight", "x_embedder.proj.weight", "final_layer.linear.weight"):
        w0 = dict(base.parameters_and_names())[name].asnumpy()
        np.testing.assert_allclose(dict(half.parameters_and_names())[name].asnumpy() - w0,
                                   0.5 * (dict(full.parameters_and_names())[name].asnumpy() - w0), atol=1e-6)


def test_pipeline_config_loads_shared_lora(peft_files):
    """sample.py and demo.py build their pipeline with PipelineConfig.build, which reads --lora
    with load_lora: a kohya file merges with --lora_scale."""
    from pixart.pipelines.config import PipelineConfig

    root, _ = peft_files
    checkpoint = str(root / "base")
    pipe = PipelineConfig(checkpoint=checkpoint, lora=str(root / "kohya_lora.safetensors"), lora_scale=0.5,
                          mode="pynative", image_size=None).build()
    expected = from_pretrained(checkpoint)
    merge_lora(expected, load_lora(root / "kohya_lora.safetensors"), strength=0.5)
    use_fused_kernels(expected)  # what the pipeline does to an fp32 DiT on CPU
    x, t, y, mask = inputs(h=8, w=12)
    np.testing.assert_array_equal(ms_forward(pipe.transformer, x, t, y, mask), ms_forward(expected, x, t, y, mask))


def test_unknown_and_dora_layouts_are_one_line_errors(tmp_path):
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_blocks_0_attn_qkv.hada_w1_a": torch.zeros(2, 2),
               "lora_unet_blocks_0_attn_qkv.hada_w1_b": torch.zeros(2, 2)}, loha)
    with pytest.raises(CheckpointError) as err:
        load_lora(loha)
    assert "\n" not in str(err.value)
    assert "its keys: lora_unet_blocks_0_attn_qkv.hada_w1_a, lora_unet_blocks_0_attn_qkv.hada_w1_b" in str(err.value)
    dora = tmp_path / "dora.safetensors"
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 16),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 2),
               "transformer_blocks.0.attn1.to_q.lora_magnitude_vector": torch.ones(16)}, dora)
    with pytest.raises(CheckpointError, match="DoRA adapters"):
        load_lora(dora)
    stranger = tmp_path / "other.safetensors"
    save_file({"lora_transformer_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, 4),
               "lora_transformer_single_blocks_0_linear1.lora_up.weight": torch.zeros(4, 2)}, stranger)
    with pytest.raises(CheckpointError, match="not PixArt transformer layers: single_blocks_0_linear1"):
        load_lora(stranger)


def test_own_adapters_export_to_peft(tmp_path, peft_files):
    """tools/convert.py --to peft: a peft folder PeftModel.from_pretrained applies to the diffusers
    model, and a diffusers-style .safetensors, both giving the adapted native model's output."""
    root, _ = peft_files
    model = from_pretrained(str(root / "base"))
    inject_lora(model, rank=3, alpha=6, target_modules=["attn.qkv", "cross_attn.kv_linear", "mlp.fc1", "attn.proj"])
    rng = np.random.default_rng(2)
    for name, param in model.parameters_and_names():
        if name.endswith("lora_B"):
            param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.2))
    model.set_train(False)
    x, t, y, mask = inputs(h=8, w=12)
    adapted = ms_forward(model, x, t, y, mask)
    ours = tmp_path / "lora.safetensors"
    save_lora(model, ours, metadata={"base_model": "base"})
    for target in (tmp_path / "peft_out", tmp_path / "single.safetensors"):
        result = run_convert("--source", ours, "--target", target, "--to", "peft")
        assert result.returncode == 0, result.stderr
    with open(tmp_path / "peft_out" / "adapter_config.json") as f:
        assert (json.load(f)["r"], len(os.listdir(tmp_path / "peft_out"))) == (3, 2)
    reference = PeftModel.from_pretrained(PixArtTransformer2DModel.from_pretrained(str(root / "base")).eval(),
                                          str(tmp_path / "peft_out"))
    np.testing.assert_allclose(torch_forward(reference.base_model.model, x, t, y, mask), adapted, atol=1e-5, rtol=0)
    fresh = from_pretrained(str(root / "base"))
    merge_lora(fresh, str(tmp_path / "single.safetensors"))
    np.testing.assert_allclose(ms_forward(fresh, x, t, y, mask), adapted, atol=1e-5, rtol=0)


def test_sample_py_merges_a_kohya_lora(tmp_path):
    """sample.py --lora with a OneTrainer-style file: the PNG equals the Python API's image with the
    same LoRA and scale, and differs from the base model's."""
    import subprocess
    import sys

    from PIL import Image

    from pixart.pipelines.pixart_pipeline import PixArtSigmaPipeline
    from tiny_models import make_pipeline_folder

    folder = make_pipeline_folder(tmp_path / "pipe", "sigma", sample_size=32)
    model = PixArtTransformer2DModel.from_pretrained(str(folder / "transformer"))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "ff.net.2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    kohya = {}
    for key, value in get_peft_model_state_dict(peft_model).items():
        module, ab = key.replace("base_model.model.", "").rsplit(".lora_", 1)
        name = "lora_transformer_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if ab.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    lora = tmp_path / "style.safetensors"
    save_file(kohya, lora)

    settings = ["--prompt", "a red car", "--seed", "3", "--sampling_steps", "2", "--image_width", "64",
                "--image_height", "64", "--mode", "pynative"]
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), "sample.py"),
                             "--pretrained_path", str(folder), "--lora", str(lora), "--lora_scale", "0.7",
                             "--output_path", str(tmp_path / "out"), *settings], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    png = Image.open(tmp_path / "out" / "00000.png")
    assert png.text["model"] == "pipe+style.safetensors"

    def api_image(**lora_args):
        pipe = PixArtSigmaPipeline.from_pretrained(str(folder), mode="pynative", **lora_args)
        return np.asarray(next(pipe.generate(["a red car"], seed=3, num_inference_steps=2, height=64, width=64,
                                             progress=False)).image)

    np.testing.assert_array_equal(np.asarray(png), api_image(lora=str(lora), lora_scale=0.7))
    assert np.abs(np.asarray(png).astype(int) - api_image().astype(int)).max() > 0
