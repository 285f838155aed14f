"""Cached features (tools/extract_features.py + pixart/data/features.py) against on-the-fly training.

The key property: for the same records, seed and epoch, a cached batch holds the same latents (same
posterior, same ε) and the same caption embeddings as TrainDataset + VAE encode + T5 compute.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mindspore as ms

from pixart.data import BucketBatchSampler, TrainDataset, get_bins, load_batch, load_records
from pixart.data.features import (FeatureDataset, encode_captions, encode_posteriors, latent_noise, load_feature_batch,
                                  read_index, sample_latents)
from pixart.models.autoencoder_kl import AutoencoderKL
from pixart.models.pixart_weights import from_pretrained as load_dit
from pixart.models.t5 import T5Encoder
from pixart.models.tokenizer import PromptTokenizer, encode_prompts
from pixart.utils.errors import ConfigError
from tiny_models import make_pipeline_folder
from pixart.data.extract import extract_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 300  # Σ
BASE = 256        # smallest bins: buckets of ~256 px keep the tiny VAE fast
# (height, width) of the generated images: several aspect buckets, two records in some of them.
SIZES = [(64, 64), (48, 64), (64, 40), (32, 64), (64, 64), (40, 64), (64, 48), (48, 64)]


def write_dataset(folder, sizes=SIZES):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    records = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "images" / f"im{i}.png")
        records.append({"path": f"im{i}.png", "prompt": f"a red car on the river {i}", "height": h, "width": w,
                        "ratio": h / w, "sharegpt4v": "" if i == 2 else f"a photo of a small house with a tree {i}"})
    (folder / "labels.json").write_text(json.dumps(records))
    return folder / "labels.json", folder / "images"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Σ pipeline folder, a dataset, its features, and the on-the-fly models."""
    root = tmp_path_factory.mktemp("features")
    pipe = make_pipeline_folder(root / "pipe", "sigma", sample_size=32)
    json_path, image_dir = write_dataset(root)
    records, _ = load_records(json_path, image_dir)
    bins = get_bins(BASE)
    feats = root / "feats"
    summary = extract_features(records, image_dir, feats, bins, pipe / "vae", pipe / "text_encoder", pipe / "tokenizer",
                               max_length=MAX_LENGTH, image_size=BASE, progress=False)
    return {"root": root, "pipe": pipe, "json": json_path, "images": image_dir, "records": records, "bins": bins,
            "feats": feats, "summary": summary,
            "vae": AutoencoderKL.from_pretrained(pipe / "vae"),
            "tokenizer": PromptTokenizer.from_pretrained(pipe / "tokenizer"),
            "t5": T5Encoder.from_pretrained(pipe / "text_encoder")}


def on_the_fly(setup, dataset, indices, epoch):
    """What a train step computes without the cache: load images, VAE-encode, sample, run T5."""
    batch, skipped = load_batch(dataset, indices, epoch)
    assert skipped == 0
    mean, std = encode_posteriors(setup["vae"], batch["images"])
    latents = sample_latents(mean, std, latent_noise(dataset.seed, epoch, batch["indices"], mean.shape[1:]),
                             setup["vae"].scaling_factor)
    # train.py feeds captions to T5 uncleaned (as the original training code), as the cache does.
    embeds, mask = encode_captions(setup["tokenizer"], setup["t5"], batch["captions"], MAX_LENGTH, clean_caption=False)
    return batch, latents, embeds, mask


def test_cached_batches_equal_on_the_fly_training(setup):
    assert setup["summary"] == {"records": 8, "with_features": 8, "unreadable": 0, "encoded_images": 8,
                                "encoded_captions": 15}
    seed = 3
    live = TrainDataset(setup["records"], setup["images"], setup["bins"], real_prompt_ratio=0.5, seed=seed)
    cached = FeatureDataset(setup["feats"], real_prompt_ratio=0.5, seed=seed)
    assert cached.scaling_factor == setup["vae"].scaling_factor and cached.max_length == MAX_LENGTH
    assert [{k: r[k] for k in setup["records"][0]} for r in cached.records] == setup["records"]
    live_sampler = BucketBatchSampler(live.records, live.bins, 2, seed=seed, drop_last=False)
    cached_sampler = BucketBatchSampler(cached.records, cached.bins, 2, seed=seed, drop_last=False)
    assert cached_sampler.epoch_plan(1) == live_sampler.epoch_plan(1)
    plan = cached_sampler.epoch_plan(0)
    assert plan == live_sampler.epoch_plan(0)  # the loop can swap datasets: same batches
    sources, epoch = set(), 0
    for indices in plan:
        batch, latents, embeds, mask = on_the_fly(setup, live, indices, epoch)
        cached_batch, skipped = load_feature_batch(cached, indices, epoch)
        assert skipped == 0
        for key in ("captions", "indices", "size", "bucket"):
            assert cached_batch[key] == batch[key]
        np.testing.assert_array_equal(cached_batch["original_sizes"], batch["original_sizes"])
        np.testing.assert_array_equal(cached_batch["ratios"], batch["ratios"])
        assert cached_batch["latents"].shape == latents.shape == (len(indices), 4, batch["size"][0] // 8,
                                                                   batch["size"][1] // 8)
        # Bitwise equal: the same encoder calls (one image / caption each) and the same ε.
        np.testing.assert_array_equal(cached_batch["latents"], latents)
        np.testing.assert_array_equal(cached_batch["caption_mask"], mask)
        real = mask.astype(bool)  # padded positions are not stored: zeros, masked out of the DiT
        np.testing.assert_array_equal(cached_batch["caption_embeds"][real], embeds[real])
        assert not cached_batch["caption_embeds"][~real].any()
        sources.update(cached_batch["caption_sources"])
    assert sources == {"prompt", "sharegpt4v"}  # both stored captions are used at ratio 0.5


def test_latent_noise_is_fresh_per_epoch_and_can_be_given(setup):
    cached = FeatureDataset(setup["feats"], real_prompt_ratio=1.0, seed=0)
    indices = [0, 4]  # both 64x64: one bucket
    first, _ = load_feature_batch(cached, indices, epoch=0)
    again, _ = load_feature_batch(cached, indices, epoch=0)
    other, _ = load_feature_batch(cached, indices, epoch=1)
    np.testing.assert_array_equal(first["latents"], again["latents"])
    assert np.abs(first["latents"] - other["latents"]).min() > 0  # new ε everywhere
    zero, _ = load_feature_batch(cached, indices, epoch=0, noise=np.zeros_like(first["latents"]))
    posterior = setup["vae"].encode(load_batch(TrainDataset(setup["records"], setup["images"], setup["bins"]),
                                               indices)[0]["images"])
    np.testing.assert_allclose(zero["latents"], (posterior.mean * setup["vae"].scaling_factor).asnumpy(), atol=1e-6)
    assert first["captions"] == [setup["records"][i]["prompt"] for i in indices]
    cached.check_compatible(image_size=BASE, max_length=MAX_LENGTH, clean_caption=False)
    with pytest.raises(ConfigError, match="image_size 256 .training uses 512"):
        cached.check_compatible(image_size=512, max_length=MAX_LENGTH)


def test_trimmed_padding_gives_the_same_dit_output(setup):
    """Dropping padded T5 positions changes nothing downstream: the DiT masks them out."""
    dit = load_dit(str(setup["pipe"] / "transformer"), model_max_length=MAX_LENGTH)
    cached = FeatureDataset(setup["feats"], real_prompt_ratio=0.0, seed=1)
    live = TrainDataset(setup["records"], setup["images"], setup["bins"], real_prompt_ratio=0.0, seed=1)
    indices = [1, 7]  # both 48x64
    batch, latents, embeds, mask = on_the_fly(setup, live, indices, epoch=0)
    cached_batch, _ = load_feature_batch(cached, indices, epoch=0)
    assert not np.array_equal(cached_batch["caption_embeds"], embeds)  # padding really differs
    t = ms.Tensor(np.array([10, 700], np.int32))
    for drop in (None, ms.Tensor(np.array([False, True]))):  # class dropout uses the mask too
        live_out = dit(ms.Tensor(latents), t, ms.Tensor(embeds), ms.Tensor(mask), drop_ids=drop).asnumpy()
        cached_out = dit(ms.Tensor(cached_batch["latents"]), t, ms.Tensor(cached_batch["caption_embeds"]),
                         ms.Tensor(cached_batch["caption_mask"]), drop_ids=drop).asnumpy()
        np.testing.assert_allclose(cached_out, live_out, rtol=0, atol=1e-6)


def test_kept_padding_fp16_and_null_caption(setup, tmp_path):
    records = setup["records"][:2]
    pipe = setup["pipe"]
    extract_features(records, setup["images"], tmp_path / "f", setup["bins"], pipe / "vae", pipe / "text_encoder",
                     pipe / "tokenizer", max_length=MAX_LENGTH, image_size=BASE, keep_padding=True,
                     embed_dtype="fp16", progress=False)
    cached = FeatureDataset(tmp_path / "f", real_prompt_ratio=1.0)
    item = cached.get(0)
    embeds, mask = encode_prompts(setup["tokenizer"], setup["t5"], [records[0]["prompt"]], MAX_LENGTH, False)
    full = embeds.asnumpy()[0]
    np.testing.assert_array_equal(item["caption_embeds"], full.astype(np.float16).astype(np.float32))
    null, null_mask = cached.null_caption()
    embeds, mask = encode_prompts(setup["tokenizer"], setup["t5"], [""], MAX_LENGTH, False)
    assert null.shape == (1, MAX_LENGTH, 32) and null_mask.sum() == 1
    np.testing.assert_array_equal(null_mask, mask.asnumpy())
    np.testing.assert_array_equal(null, embeds.asnumpy().astype(np.float16).astype(np.float32))


def test_resume_redoes_only_what_changed(setup, tmp_path):
    root = tmp_path
    json_path, image_dir = write_dataset(root, SIZES[:4])
    pipe, bins = setup["pipe"], setup["bins"]

    def run(**kwargs):
        records, counts = load_records(json_path, image_dir)
        return extract_features(records, image_dir, root / "f", bins, pipe / "vae", pipe / "text_encoder",
                                pipe / "tokenizer", max_length=MAX_LENGTH, image_size=BASE, progress=False,
                                counts=counts, **kwargs)

    assert run()["encoded_images"] == 4
    assert run() == {"records": 4, "with_features": 4, "unreadable": 0, "encoded_images": 0, "encoded_captions": 0}
    files = [root / "f" / r["latent_file"] for r in read_index(root / "f")["records"]]
    before = [f.read_bytes() for f in files]
    labels = json.loads(json_path.read_text())
    labels[1]["prompt"] = "a blue boat"
    json_path.write_text(json.dumps(labels))
    Image.new("RGB", (64, 64), (200, 10, 10)).save(image_dir / "im0.png")  # same name, new pixels
    summary = run()
    assert (summary["encoded_images"], summary["encoded_captions"]) == (1, 2)  # im0; record 1's two captions
    cached = FeatureDataset(root / "f", real_prompt_ratio=1.0)
    assert cached.get(1)["caption"] == "a blue boat"
    after = [f.read_bytes() for f in files]
    assert [a == b for a, b in zip(before, after)] == [False, True, True, True]

    with pytest.raises(ConfigError, match="other settings"):  # a different model config
        run(embed_dtype="bf16")
    # An interrupted run leaves the index marked incomplete: training refuses it until finished.
    index = json.loads((root / "f" / "index.json").read_text())
    (root / "f" / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ConfigError, match="did not finish"):
        FeatureDataset(root / "f")
    run()
    assert read_index(root / "f")["complete"]


def test_unreadable_images_and_damaged_features_are_skipped(setup, tmp_path):
    json_path, image_dir = write_dataset(tmp_path, SIZES[:3])
    (image_dir / "im1.png").write_bytes(b"not a png")
    labels = json.loads(json_path.read_text())
    json_path.write_text(json.dumps(labels + [{**labels[0], "prompt": "a second caption of im0"}]))
    records, _ = load_records(json_path, image_dir)
    pipe = setup["pipe"]
    summary = extract_features(records, image_dir, tmp_path / "f", setup["bins"], pipe / "vae", pipe / "text_encoder",
                               pipe / "tokenizer", max_length=MAX_LENGTH, image_size=BASE, progress=False)
    # im0 is encoded once for its two records; each record keeps its own captions.
    assert summary == {"records": 4, "with_features": 3, "unreadable": 1, "encoded_images": 2,
                       "encoded_captions": 5}
    cached = FeatureDataset(tmp_path / "f", real_prompt_ratio=1.0)
    assert [r["path"] for r in cached.records] == ["im0.png", "im2.png", "im0.png"]
    assert cached.records[0]["latent_file"] == cached.records[2]["latent_file"]
    assert cached.get(2)["caption"] == "a second caption of im0"
    assert not np.array_equal(cached.get(0)["caption_embeds"], cached.get(2)["caption_embeds"])
    with open(tmp_path / "f" / cached.records[0]["latent_file"], "r+b") as f:
        f.truncate(40)
    batch, skipped = load_feature_batch(cached, [0], 0)
    assert batch is None and skipped == 1
    os.remove(tmp_path / "f" / cached.records[1]["text_file"])
    assert load_feature_batch(cached, [1], 0) == (None, 1)


def test_cli_reads_train_config_and_reports_errors_in_one_line(setup, tmp_path):
    config = tmp_path / "train.yaml"  # training keys this tool does not use are ignored
    config.write_text(f"image_size: {BASE}\nversion: alpha\nt5_max_length: 100\nmulti_scale: false\n"
                      f"start_learning_rate: 2.0e-5\nepochs: 3\npretrained_path: {setup['pipe']}\nbatch_size: 4\n")
    records = json.loads(setup["json"].read_text())[:2]
    (tmp_path / "labels.json").write_text(json.dumps(records))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "-c", str(config),
           "--json_path", str(tmp_path / "labels.json"), "--image_dir", str(setup["images"]),
           "--feature_dir", str(tmp_path / "f"), "--progress", "False"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "features of 2/2 records" in result.stderr
    index = read_index(tmp_path / "f")
    assert index["config"]["max_length"] == 100 and index["config"]["image_size"] == BASE
    assert index["config"]["bins"] == {"1.0": [BASE, BASE]}  # multi_scale off: one square bucket
    assert [r["path"] for r in index["records"]] == ["im0.png", "im1.png"]

    result = subprocess.run(cmd[:-4] + ["--progress", "False"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "--feature_dir is required" in err
