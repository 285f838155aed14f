"""pixart.data: bins and resize against diffusers, record validation, bucket sampler, dataset items."""
import json
import logging

import numpy as np
import pytest
import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                    ASPECT_RATIO_1024_BIN)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN
from PIL import Image

from pixart.data import (BucketBatchSampler, TrainDataset, UnreadableImage, bucket_of, classify_height_width_bin,
                         get_bins, load_batch, load_records, resize_and_crop, resize_and_crop_batch)
from pixart.utils.errors import ConfigError

DIFFUSERS_BINS = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN,
                  2048: ASPECT_RATIO_2048_BIN}


def as_diffusers(bins):
    """Our {ratio: (h, w)} in diffusers' form {ratio: [float h, float w]}."""
    return {key: [float(h), float(w)] for key, (h, w) in bins.items()}


# ---------------------------------------------------------------------------------------------
# Bins
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", [256, 512, 1024, 2048])
def test_bins_equal_diffusers(base):
    ours = get_bins(base)
    assert as_diffusers(ours) == DIFFUSERS_BINS[base]
    assert list(ours) == list(DIFFUSERS_BINS[base])  # same order: ties resolve the same way
    assert len(ours) == (40 if base == 2048 else 33)


def test_bins_4096_is_twice_2048():
    bins = get_bins(4096)
    assert bins["1.0"] == (4096, 4096)
    assert bins["0.25"] == (2048, 8192) and bins["4.0"] == (8192, 2048)
    assert all(bins[k] == (2 * h, 2 * w) for k, (h, w) in get_bins(2048).items())
    assert as_diffusers(bins) == ASPECT_RATIO_4096_BIN  # diffusers ships it for Sana


def test_bins_convention_height_width():
    bins = get_bins(1024)
    assert bins["0.25"] == (512, 2048) and bins["4.0"] == (2048, 512)  # key = height / width


def test_get_bins_rejects_unknown_base():
    with pytest.raises(ConfigError, match="256, 512, 1024, 2048, 4096"):
        get_bins(768)
    get_bins(1024)["1.0"] = (1, 1)  # a copy: the shared table is untouched
    assert get_bins(1024)["1.0"] == (1024, 1024)


@pytest.mark.parametrize("base", [256, 512, 1024, 2048])
def test_classify_matches_diffusers(base):
    rng = np.random.default_rng(base)
    bins = get_bins(base)
    sizes = rng.integers(16, 5000, size=(2000, 2)).tolist()
    sizes += [[h, w] for h, w in bins.values()] + [[1, 4], [4, 1], [1, 100], [100, 1]]
    for h, w in sizes:
        expected = PixArtImageProcessor.classify_height_width_bin(h, w, DIFFUSERS_BINS[base])
        assert classify_height_width_bin(h, w, bins) == expected, (h, w)


# ---------------------------------------------------------------------------------------------
# Resize and centre crop
# ---------------------------------------------------------------------------------------------

def diffusers_resize(x, height, width):
    return PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(x), width, height).numpy()


def test_resize_and_crop_batch_matches_diffusers():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(200):
        (oh, ow), (nh, nw) = rng.integers(4, 70, 2).tolist(), rng.integers(4, 70, 2).tolist()
        x = rng.uniform(-1, 1, (2, 3, oh, ow)).astype(np.float32)
        ref = diffusers_resize(x, nh, nw)
        out = resize_and_crop_batch(x, nh, nw)
        assert out.shape == (2, 3, nh, nw) and out.dtype == np.float32
        if ref.shape == out.shape:  # see test_resize_and_crop_never_short
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
            compared += 1
    assert compared > 180


def test_resize_and_crop_pipeline_case():
    """The pipeline's use: a 1024-bin image (1.07 → 1024x960) back to a requested 1000x900, in [-1, 1]."""
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 1024, 960)).astype(np.float32)
    np.testing.assert_allclose(resize_and_crop_batch(x, 1000, 900), diffusers_resize(x, 1000, 900), atol=1e-6)
    np.testing.assert_array_equal(resize_and_crop_batch(x, 1024, 960), x)  # same size: unchanged


def test_resize_and_crop_never_short():
    """diffusers truncates 7 * (61 / 7) = 60.99... to 60, and its crop offset (60 - 61) // 2 = -1 then
    slices a single row; we never resize below the target."""
    x = np.ones((1, 1, 7, 7), np.float32)
    assert diffusers_resize(x, 61, 20).shape[2] != 61
    assert resize_and_crop_batch(x, 61, 20).shape == (1, 1, 61, 20)


def test_resize_and_crop_single_image_layouts():
    rng = np.random.default_rng(2)
    hwc = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = resize_and_crop(hwc, 40, 40)
    ref = diffusers_resize(hwc.astype(np.float32).transpose(2, 0, 1)[None], 40, 40)[0].transpose(1, 2, 0)
    assert out.shape == (40, 40, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4)  # uint8 values: 255 * 1e-6 tolerance scale
    assert resize_and_crop(hwc[..., 0], 20, 60).shape == (20, 60)
    pil = resize_and_crop(Image.fromarray(hwc), 40, 24)
    assert isinstance(pil, Image.Image) and pil.size == (24, 40)


def test_resize_and_crop_pil_is_centred():
    """A wide image with a marked centre column keeps it in the middle after crop."""
    array = np.zeros((20, 80, 3), np.uint8)
    array[:, 39:41] = 255
    out = np.asarray(resize_and_crop(Image.fromarray(array), 40, 40))  # 20x80 → 40x160 → centre 40
    column_energy = out[..., 0].astype(float).sum(axis=0)
    assert abs(int(np.argmax(column_energy)) - 19.5) <= 1.5


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def make_dataset(tmp_path, sizes, name="data.json", extra=None):
    """PNG images of the given (height, width) plus a JSON in the dataset format README describes."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    records = []
    for i, (h, w) in enumerate(sizes):
        Image.new("RGB", (w, h), COLOURS[i % len(COLOURS)]).save(image_dir / f"img{i}.png")
        records.append({"path": f"img{i}.png", "prompt": f"prompt {i}", "sharegpt4v": f"long caption {i}",
                        "height": h, "width": w, "ratio": h / w})
    records += extra or []
    json_path = tmp_path / name
    json_path.write_text(json.dumps(records))
    return str(json_path), str(image_dir)


def test_load_records_ok(tmp_path):
    json_path, image_dir = make_dataset(tmp_path, [(32, 32), (16, 64), (64, 16)])
    records, counts = load_records(json_path, image_dir)
    assert counts == {"total": 3, "bad": 0, "extreme_ratio": 0, "kept": 3}
    assert records[1] == {"path": "img1.png", "prompt": "prompt 1", "sharegpt4v": "long caption 1",
                          "height": 16, "width": 64, "ratio": 0.25}


def test_load_records_reports_bad_records(tmp_path):
    bad = [
        {"path": "img0.png", "sharegpt4v": "", "height": 32, "width": 32, "ratio": 1.0},    # no prompt
        {"path": "gone.png", "prompt": "p", "height": 32, "width": 32, "ratio": 1.0},       # no file
        {"path": "img0.png", "prompt": "p", "height": "32", "width": 32, "ratio": 1.0},     # str height
        {"path": "img0.png", "prompt": "p", "height": 32, "width": 64, "ratio": 2.0},       # w/h swapped
    ]
    json_path, image_dir = make_dataset(tmp_path, [(32, 32), (32, 32)], extra=bad)
    with pytest.raises(ConfigError) as info:
        load_records(json_path, image_dir)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"4 of 6 records in {json_path} are invalid: ")
    assert "#2: missing key 'prompt'" in message
    assert "#3: image not found: gone.png" in message
    assert "#4: 'height' must be a positive integer, got '32'" in message
    assert "#5: 'ratio' 2.0 is not height/width = 0.5" in message
    assert "skip_bad_records" in message


def test_load_records_lists_only_first_few(tmp_path):
    bad = [{"path": f"missing{i}.png", "prompt": "p", "height": 8, "width": 8, "ratio": 1.0} for i in range(9)]
    json_path, image_dir = make_dataset(tmp_path, [(32, 32)], extra=bad)
    with pytest.raises(ConfigError, match=r"9 of 10 records .*#5: .*\(and 4 more\)"):
        load_records(json_path, image_dir)


def test_load_records_skip_bad_records(tmp_path, caplog):
    bad = [{"path": "gone.png", "prompt": "p", "height": 32, "width": 32, "ratio": 1.0}, "not a record"]
    json_path, image_dir = make_dataset(tmp_path, [(32, 32), (16, 32)], extra=bad)
    with caplog.at_level(logging.WARNING, logger="pixart.data.dataset"):
        records, counts = load_records(json_path, image_dir, skip_bad_records=True)
    assert [r["path"] for r in records] == ["img0.png", "img1.png"]
    assert counts["bad"] == 2 and counts["kept"] == 2
    assert "2 of 4 records" in caplog.text


def test_load_records_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset JSON not found"):
        load_records(str(tmp_path / "nope.json"), str(tmp_path))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_records(str(tmp_path / "broken.json"), str(tmp_path))
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ConfigError, match="must hold a list"):
        load_records(str(tmp_path / "dict.json"), str(tmp_path))


def test_load_records_filters_extreme_ratios_tall_and_wide(tmp_path):
    # 10:1 tall and 1:10 wide are dropped; 4.5 and 1/4.5 exactly are kept.
    json_path, image_dir = make_dataset(tmp_path, [(32, 32), (64, 6), (6, 64), (45, 10), (10, 45)])
    records, counts = load_records(json_path, image_dir)
    assert counts["extreme_ratio"] == 2
    assert [(r["height"], r["width"]) for r in records] == [(32, 32), (45, 10), (10, 45)]


# ---------------------------------------------------------------------------------------------
# Buckets and sampler
# ---------------------------------------------------------------------------------------------

def synthetic_records(n, seed=0, bins=None):
    """n records spread over every bin of `bins` (plus random ratios), no files needed."""
    rng = np.random.default_rng(seed)
    exact = [(h, w) for h, w in (bins or get_bins(256)).values()]
    sizes = [exact[i % len(exact)] if i < 2 * len(exact) else tuple(rng.integers(100, 400, 2).tolist())
             for i in range(n)]
    return [{"path": f"{i}.png", "prompt": "p", "sharegpt4v": "s", "height": h, "width": w, "ratio": h / w}
            for i, (h, w) in enumerate(sizes)]


def test_every_bin_reachable_including_last(tmp_path):
    json_path, image_dir = make_dataset(tmp_path, [(64, 16), (16, 64), (32, 32)])  # 4.0, 0.25, 1.0
    records, _ = load_records(json_path, image_dir)
    bins = get_bins(256)
    assert [bucket_of(r, bins) for r in records] == ["4.0", "0.25", "1.0"]
    sampler = BucketBatchSampler(records, bins, batch_size=1, shuffle=False)
    assert sorted(sampler) == [[0], [1], [2]]  # the 4.0 image is batched too
    for base in (256, 512, 1024, 2048, 4096):
        bins = get_bins(base)
        hit = {bucket_of({"height": h, "width": w}, bins) for h, w in bins.values()}
        assert hit == set(bins)


def test_batches_are_single_bucket_and_cover_data():
    bins = get_bins(256)
    records = synthetic_records(500)
    sampler = BucketBatchSampler(records, bins, batch_size=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 4
        assert len({bucket_of(records[i], bins) for i in batch}) == 1
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    # Only each bucket's incomplete tail is dropped.
    expected = sum(len(ix) // 4 * 4 for ix in sampler.buckets.values())
    assert len(seen) == expected


def test_drop_last_false_keeps_everything():
    bins = get_bins(256)
    records = synthetic_records(101)
    batches = list(BucketBatchSampler(records, bins, batch_size=4, drop_last=False, seed=1))
    assert sorted(i for b in batches for i in b) == list(range(101))
    assert all(len({bucket_of(records[i], bins) for i in b}) == 1 for b in batches)


def test_rank_shards_disjoint_and_equal_length():
    bins = get_bins(256)
    records = synthetic_records(301)
    shards = [list(BucketBatchSampler(records, bins, 3, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) > 0
    flat = [set(i for b in shard for i in b) for shard in shards]
    assert not flat[0] & flat[1]
    # Padded (drop_last=False) shards are still equal in length, and cover everything.
    padded = [list(BucketBatchSampler(records, bins, 3, seed=5, rank=r, world_size=2, drop_last=False))
              for r in range(2)]
    assert len(padded[0]) == len(padded[1])
    assert set(i for s in padded for b in s for i in b) == set(range(301))


def test_sampler_deterministic_per_seed_and_epoch():
    bins = get_bins(256)
    records = synthetic_records(200)

    def epoch_batches(seed, epoch):
        sampler = BucketBatchSampler(records, bins, 4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 0) == epoch_batches(0, 0)
    assert epoch_batches(0, 1) == epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(1, 0)
    # Iterating again without set_epoch moves on to the next epoch.
    sampler = BucketBatchSampler(records, bins, 4, seed=0)
    assert list(sampler) == epoch_batches(0, 0) and sampler.epoch == 1
    assert list(sampler) == epoch_batches(0, 1)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume_is_exact(drop_last):
    bins = get_bins(256)
    records = synthetic_records(250)
    make = lambda rank: BucketBatchSampler(records, bins, 4, seed=7, rank=rank, world_size=2,  # noqa: E731
                                           drop_last=drop_last)
    for rank in range(2):
        full = make(rank)
        full.set_epoch(3)
        expected = list(full)

        interrupted = make(rank)
        interrupted.set_epoch(3)
        iterator = iter(interrupted)
        head = [next(iterator) for _ in range(5)]
        state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint round trip
        assert state["epoch"] == 3 and state["consumed_batches"] == 10

        resumed = make(rank)
        resumed.load_state_dict(state)
        resumed.set_epoch(3)  # the train loop's usual call: keeps the resumed position
        assert head + list(resumed) == expected
        assert resumed.epoch == 4


def test_sampler_resume_with_fewer_ranks():
    """Two ranks take 3 steps each; one rank resumes and gets exactly the rest of the plan."""
    bins = get_bins(256)
    records = synthetic_records(200)
    ranks = [BucketBatchSampler(records, bins, 4, seed=2, rank=r, world_size=2) for r in range(2)]
    iterators = [iter(sampler) for sampler in ranks]
    done = [next(it) for _ in range(3) for it in iterators]
    single = BucketBatchSampler(records, bins, 4, seed=2)
    single.load_state_dict(ranks[0].state_dict())
    assert sorted(done + list(single)) == sorted(single.epoch_plan(0))


def test_sampler_state_at_epoch_end_moves_on():
    bins = get_bins(256)
    records = synthetic_records(100)
    sampler = BucketBatchSampler(records, bins, 4, seed=0)
    list(sampler)
    resumed = BucketBatchSampler(records, bins, 4, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    reference = BucketBatchSampler(records, bins, 4, seed=0)
    reference.set_epoch(1)
    assert resumed.epoch == 1 and list(resumed) == list(reference)


def test_sampler_rejects_mismatched_state_and_tiny_data():
    bins = get_bins(256)
    records = synthetic_records(100)
    state = BucketBatchSampler(records, bins, 4, seed=0).state_dict()
    with pytest.raises(ConfigError, match="batch_size 4 -> 2"):
        BucketBatchSampler(records, bins, 2, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="lower the batch size"):
        BucketBatchSampler(records[:3], bins, 4)


# ---------------------------------------------------------------------------------------------
# Dataset items and batches
# ---------------------------------------------------------------------------------------------

def test_dataset_item_shapes_and_range(tmp_path):
    json_path, image_dir = make_dataset(tmp_path, [(40, 20), (16, 64)])
    records, _ = load_records(json_path, image_dir)
    bins = get_bins(256)
    item = TrainDataset(records, image_dir, bins)[0]
    assert item["size"] == (352, 176) and item["bucket"] == "2.0"
    assert item["image"].shape == (3, 352, 176) and item["image"].dtype == np.float32
    np.testing.assert_allclose(item["image"][:, 100, 100], [1.0, -1.0, -1.0])  # the red image
    assert item["original_size"] == (40, 20) and item["ratio"] == 2.0
    wide = TrainDataset(records, image_dir, bins).get(1, epoch=0)
    assert wide["image"].shape == (3, 128, 512) and wide["bucket"] == "0.25"


def test_caption_choice_deterministic_and_extremes(tmp_path):
    json_path, image_dir = make_dataset(tmp_path, [(32, 32)] * 40)
    records, _ = load_records(json_path, image_dir)
    bins = get_bins(256)
    half = TrainDataset(records, image_dir, bins, real_prompt_ratio=0.5, seed=11)
    picks = [half.choose_caption(i, epoch=2)[1] for i in range(40)]
    assert picks == [TrainDataset(records, image_dir, bins, 0.5, seed=11).choose_caption(i, 2)[1]
                     for i in range(40)]
    assert 5 < picks.count("prompt") < 35
    assert picks != [half.choose_caption(i, epoch=3)[1] for i in range(40)]
    always = TrainDataset(records, image_dir, bins, real_prompt_ratio=1.0)
    never = TrainDataset(records, image_dir, bins, real_prompt_ratio=0.0)
    assert all(always.choose_caption(i, 0) == (f"prompt {i}", "prompt") for i in range(40))
    assert all(never.choose_caption(i, 0) == (f"long caption {i}", "sharegpt4v") for i in range(40))
    records[0]["sharegpt4v"] = ""  # no ShareGPT4V caption: fall back to the prompt
    assert never.choose_caption(0, 0) == ("prompt 0", "prompt")
    with pytest.raises(ConfigError):
        TrainDataset(records, image_dir, bins, real_prompt_ratio=1.5)


def test_random_flip_is_reproducible(tmp_path):
    json_path, image_dir = make_dataset(tmp_path, [(32, 32)] * 20)
    records, _ = load_records(json_path, image_dir)
    bins = get_bins(256)
    flips = [TrainDataset(records, image_dir, bins, seed=1, random_flip=True).get(i, 0)["flipped"] for i in range(20)]
    again = [TrainDataset(records, image_dir, bins, seed=1, random_flip=True).get(i, 0)["flipped"] for i in range(20)]
    assert flips == again and any(flips) and not all(flips)
    assert not any(TrainDataset(records, image_dir, bins).get(i, 0)["flipped"] for i in range(20))


def test_unreadable_image_skipped_and_counted(tmp_path):
    json_path, image_dir = make_dataset(tmp_path, [(32, 32)] * 3)
    records, _ = load_records(json_path, image_dir)
    (tmp_path / "images" / "img1.png").write_bytes(b"not a png at all")
    dataset = TrainDataset(records, image_dir, get_bins(256))
    with pytest.raises(UnreadableImage, match="img1.png"):
        dataset.get(1)
    batch, skipped = load_batch(dataset, [0, 1, 2])
    assert skipped == 1 and batch["indices"] == [0, 2]
    assert batch["images"].shape == (2, 3, 256, 256)
    assert batch["captions"] == [dataset.choose_caption(0, 0)[0], dataset.choose_caption(2, 0)[0]]
    assert batch["original_sizes"].tolist() == [[32, 32], [32, 32]] and batch["size"] == (256, 256)
    assert load_batch(dataset, [1]) == (None, 1)


def test_sampler_and_dataset_end_to_end(tmp_path):
    sizes = [(32, 32), (32, 32), (16, 64), (16, 64), (64, 16), (64, 16), (24, 48), (24, 48)]
    json_path, image_dir = make_dataset(tmp_path, sizes)
    records, _ = load_records(json_path, image_dir)
    bins = get_bins(256)
    dataset = TrainDataset(records, image_dir, bins, seed=0)
    sampler = BucketBatchSampler(records, bins, batch_size=2, seed=0)
    batches = list(sampler)
    assert len(batches) == 4
    for indices in batches:
        batch, skipped = load_batch(dataset, indices, epoch=0)
        assert skipped == 0 and batch["images"].shape[2:] == batch["size"]
