"""Image k depends only on its seed (seed + k), not on the batch it was generated in: every sampler,
stochastic ones included, and sample.py reproduces a PNG from the seed in its metadata."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixart import PixArtSigmaPipeline
from tiny_models import make_pipeline_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red car", "a small cactus with a happy face", "a boat on the river at night"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_pipeline_folder(tmp_path_factory.mktemp("pipe"), "sigma", sample_size=32)


@pytest.mark.parametrize("sampler,options,guidance", [
    ("dpm", None, 4.5), ("sa-solver", None, 4.5), ("ddim", {"eta": 0.7}, 4.5), ("iddpm", None, 4.5),
    ("sa-solver", None, 1.0),  # no guidance: the denoiser sees batch 1, not 2
])
def test_image_k_is_bitwise_the_same_at_batch_size_1_and_3(folder, sampler, options, guidance):
    pipe = PixArtSigmaPipeline.from_pretrained(str(folder), mode="pynative")
    common = dict(seed=11, num_inference_steps=3, sampler=sampler, sampler_kwargs=options, height=64, width=64,
                  use_resolution_binning=False, progress=False, guidance_scale=guidance)
    alone = [np.asarray(item.image) for item in pipe.generate(PROMPTS, batch_size=1, **common)]
    batched = [np.asarray(item.image) for item in pipe.generate(PROMPTS, batch_size=3, **common)]
    for k in range(3):
        np.testing.assert_array_equal(alone[k], batched[k], err_msg=f"{sampler}: image {k}")
    assert np.abs(alone[0].astype(int) - alone[1]).max() > 10  # different prompts/seeds: different images


def test_sample_py_reproduces_a_png_from_its_metadata_seed(folder, tmp_path):
    common = [sys.executable, os.path.join(ROOT, "sample.py"), "--pretrained_path", str(folder),
              "--sampling_method", "sa-solver", "--sampling_steps", "3", "--image_width", "64", "--image_height", "64",
              "--use_resolution_binning", "False", "--mode", "pynative"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    first = subprocess.run(common + ["--prompt_path", str(prompts), "--batch_size", "3", "--seed", "5",
                                     "--output_path", str(tmp_path / "all")], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    png = Image.open(tmp_path / "all" / "00002.png")
    assert png.text["seed"] == "7" and png.text["prompt"] == PROMPTS[2]
    again = subprocess.run(common + ["--prompt", png.text["prompt"], "--seed", png.text["seed"],
                                     "--output_path", str(tmp_path / "one")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.asarray(png), np.asarray(Image.open(tmp_path / "one" / "00000.png")))


def test_second_run_loads_the_compiled_denoiser_from_the_compile_cache(folder, tmp_path):
    """Graph mode with --compile_cache: the first run stores the denoiser graph in a folder of its
    signature, the second run at the same size loads it (the files stay untouched) and gives the
    same PNG; another size gets a folder of its own (never a graph compiled for other shapes)."""
    cache = tmp_path / "cache"
    common = [sys.executable, os.path.join(ROOT, "sample.py"), "--pretrained_path", str(folder), "--prompt", "a cat",
              "--sampling_steps", "2", "--use_resolution_binning", "False", "--mode", "graph",
              "--compile_cache", str(cache)]

    def run(out, size=64):
        result = subprocess.run(common + ["--image_width", str(size), "--image_height", str(size), "--output_path",
                                          str(tmp_path / out)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return np.asarray(Image.open(tmp_path / out / "00000.png"))

    def graphs():
        return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*.mindir")}

    first = run("a")
    stored = graphs()
    assert len(stored) == 1 and next(iter(stored)).endswith("compile_cache_0.mindir")
    np.testing.assert_array_equal(first, run("b"))
    assert graphs() == stored  # loaded, not compiled and written again
    run("c", size=96)
    assert len(graphs()) == 2 and len({k.split(os.sep)[0] for k in graphs()}) == 2
