"""sample.py end to end on a tiny diffusers folder, and its one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tiny_models import make_pipeline_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sample(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_pipeline_folder(tmp_path_factory.mktemp("pipe"), "sigma", sample_size=32)


def test_writes_png_of_requested_size_with_metadata_and_is_deterministic(folder, tmp_path):
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        result = run_sample("--pretrained_path", folder, "--prompt", "a red car", "--negative_prompt", "blurry",
                            "--image_width", 96, "--image_height", 64, "--seed", 3, "--sampling_steps", 2,
                            "--output_path", out)
        assert result.returncode == 0, result.stderr
        outs.append(out / "00000.png")
    image = Image.open(outs[0])
    assert image.size == (96, 64)  # generated at the 256-base bin, resized and cropped back
    assert image.text == {"prompt": "a red car", "negative_prompt": "blurry", "seed": "3", "steps": "2",
                          "guidance_scale": "4.5", "sampler": "dpm", "size": "96x64", "model": folder.name}
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(outs[1])))
    assert np.asarray(image).std() > 1.0


def test_prompt_file_batches_grid_and_seed_layout(folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na boat on the river\n")
    config = tmp_path / "tiny.yaml"  # the seed layout: a DiT checkpoint plus component folders
    config.write_text(f"checkpoint: {folder}/transformer\nvae_root: {folder}/vae\n"
                      f"text_encoder_root: {folder}/text_encoder\ntokenizer_root: {folder}/tokenizer\n"
                      "sampling_method: ddim\nsampling_steps: 2\n")
    out = tmp_path / "out"
    result = run_sample("-c", config, "--prompt_path", prompts, "--num_images", 2, "--batch_size", 3,
                        "--image_width", 64, "--image_height", 64, "--use_resolution_binning", "False",
                        "--imagegrid", "True", "--mode", "pynative", "--output_path", out)
    assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(out))
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png"]
    assert [Image.open(out / n).text["prompt"] for n in names[:4]] == ["a cat", "a cat", "a boat on the river",
                                                                        "a boat on the river"]
    assert Image.open(out / "00001.png").text["seed"] == "43" and Image.open(out / "00000.png").text["sampler"] == "ddim"
    assert Image.open(out / "grid.png").size == (128, 128)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_weights_say_how_to_get_them(tmp_path):
    result = run_sample("--checkpoint", tmp_path / "models/PixArt-Sigma-XL-2-1024-MS.ckpt", "--sampling_steps", 1)
    assert result.returncode == 2
    assert_one_line_error(result, "PixArt-Sigma-XL-2-1024-MS.pth", "python tools/convert.py --source")
    (tmp_path / "m.ckpt").write_bytes(b"x")
    result = run_sample("--checkpoint", tmp_path / "m.ckpt", "--vae_root", tmp_path / "vae")
    assert result.returncode == 2
    assert_one_line_error(result, "vae", "pixart_sigma_sdxlvae_T5_diffusers")


@pytest.mark.parametrize("args,fragment", [
    (["--image_width", "100"], "multiple of 8"),
    (["--image_height", "99999"], "multiple of 8"),
    (["--sampling_steps", "0"], "at least 1"),
    (["-c", "configs/inference/nope.yaml"], "does not exist"),
    (["--sampling_method", "euler"], "invalid choice"),
])
def test_bad_arguments_are_one_line_errors(args, fragment):
    assert_one_line_error(run_sample(*args), fragment)


def test_empty_prompt_file_and_unknown_config_key(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_line_error(run_sample("--prompt_path", empty), "has no prompts")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling_stepz: 3\n")
    assert_one_line_error(run_sample("-c", bad), "unknown key 'sampling_stepz'", "sampling_steps")


def test_shipped_configs_parse():
    from pixart.cli import parse_args_with_config, sample_parser

    folder = os.path.join(ROOT, "configs", "inference")
    names = sorted(os.listdir(folder))
    assert names == sorted(f"{n}.yaml" for n in [
        "pixart-sigma-256x256", "pixart-sigma-512-MS", "pixart-sigma-1024-MS", "pixart-sigma-2K-MS",
        "pixart-sigma-2K-MS-KV-Compress", "pixart-sigma-4K-MS-KV-Compress", "pixart-alpha-256x256",
        "pixart-alpha-512x512", "pixart-alpha-1024-MS", "pixart-alpha-lcm-1024-MS", "pixart-alpha-dmd-512x512"])
    for name in names:
        args = parse_args_with_config(sample_parser(), ["-c", os.path.join(folder, name)])
        assert args.checkpoint.startswith("models/") and args.image_size in (256, 512, 1024, 2048, 4096)
        assert args.kv_compress == ("KV" in name)


def test_lora_is_merged_and_named(folder, tmp_path):
    import mindspore as ms

    from pixart.models.pixart_weights import from_pretrained
    from pixart.models.lora import inject_lora, lora_modules, save_lora

    model = from_pretrained(str(folder / "transformer"))
    inject_lora(model, rank=2, alpha=2)
    rng = np.random.default_rng(0)
    for module in lora_modules(model).values():  # a trained-looking update (B starts at zero)
        module.lora_B.set_data(ms.Tensor(rng.standard_normal(module.lora_B.shape).astype(np.float32) * 0.5))
    save_lora(model, str(tmp_path / "style.safetensors"))
    common = ["--pretrained_path", folder, "--prompt", "a cat", "--image_width", 64, "--image_height", 64,
              "--use_resolution_binning", "False", "--sampling_steps", 2, "--mode", "pynative"]
    plain = run_sample(*common, "--output_path", tmp_path / "plain")
    adapted = run_sample(*common, "--lora", tmp_path / "style.safetensors", "--output_path", tmp_path / "lora")
    assert plain.returncode == 0 and adapted.returncode == 0, adapted.stderr
    image = Image.open(tmp_path / "lora" / "00000.png")
    assert image.text["model"] == f"{folder.name}+style.safetensors"
    assert np.abs(np.asarray(image, np.float32) - np.asarray(Image.open(tmp_path / "plain" / "00000.png"))).max() > 5
    assert_one_line_error(run_sample(*common, "--lora", tmp_path / "none.safetensors"), "none.safetensors does not exist")
