"""train.py on tiny models (CPU): learning, exact resume after SIGKILL, checkpoints, EMA, bad data.

One reference run (in this process) is shared by most tests: 6 images, 2 per micro-batch, 2
micro-batches accumulated per step (3 batches per epoch, so every other step takes its second
micro-batch from the next epoch), 10 CAME steps with warm-up, class dropout, EMA, validation images
at step 5 and checkpoints every 3 steps (the last 2 kept).
"""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import mindspore as ms

import train
from pixart.train.config import parse_train_config
from pixart.utils.checkpoint import read_state_dict
from pixart.utils.errors import ConfigError, run_cli
from tiny_models import make_pipeline_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
_CACHE = {}


# ----------------------------------------------------------------------------- shared data and runs


def make_images(folder, count=4, extra_records=()):
    """``count`` small RGB images (two halves of different colours) and their labels.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        size = 48 + 8 * (i % 2)
        pixels = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        pixels[: size // 2] += np.array([180, 40 * i, 30], np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        records.append({"path": f"img{i}.png", "prompt": f"a red house number {i}",
                        "sharegpt4v": f"a photo of a red house {i} on a green field", "height": size, "width": size,
                        "ratio": 1.0})
    records += list(extra_records)
    (folder / "labels.json").write_text(json.dumps(records))
    return folder


def reference_setup(tmp_path_factory):
    """(pipeline folder, image folder), made once per session."""
    if "setup" not in _CACHE:
        base = tmp_path_factory.getbasetemp() / "train_reference"
        _CACHE["setup"] = (make_pipeline_folder(base / "pipe", "sigma", sample_size=32),
                           make_images(base / "data", count=6))
    return _CACHE["setup"]


def train_argv(pipe, data, out, *extra):
    return ["--pretrained_path", str(pipe), "--json_path", str(data / "labels.json"), "--image_dir", str(data),
            "--image_size", "256", "--t5_max_length", "16", "--batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_steps", str(STEPS), "--start_learning_rate", "1e-3", "--warmup_steps", "2",
            "--class_dropout_prob", "0.25", "--ema_rate", "0.9", "--log_loss_interval", "1",
            "--ckpt_save_interval", "3", "--ckpt_max_keep", "2", "--visualize", "True", "--visualize_interval", "5",
            "--sampling_steps", "2", "--validation_prompts", "a red house", "--output_path", str(out), *extra]


def reference_run(tmp_path_factory):
    """The uninterrupted reference run (in this process, once per session): (trainer, output folder)."""
    if "run" not in _CACHE:
        pipe, data = reference_setup(tmp_path_factory)
        out = tmp_path_factory.getbasetemp() / "train_reference" / "out"
        _CACHE["run"] = (train.main(train_argv(pipe, data, out)), out)
        for handler in [h for h in logging.getLogger().handlers if getattr(h, "pixart_train", False)]:
            logging.getLogger().removeHandler(handler)  # train.py's log handlers: done with them
            handler.close()
    return _CACHE["run"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def run_train(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_same_arrays(a, b, keys=None):
    keys = keys or [k for k in a if isinstance(a[k], np.ndarray)]
    assert keys
    for key in keys:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- learning and outputs


def test_loss_falls_when_overfitting_six_images(reference):
    trainer, out = reference
    losses = [loss for _, loss in trainer.history]
    assert [step for step, _ in trainer.history] == list(range(1, STEPS + 1))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.7 * first, losses
    log = (out / "train.log").read_text()
    assert "[rank 0/1]" in log and f"step {STEPS}/{STEPS}" in log


def test_checkpoint_contents_and_keep_last_k(reference):
    trainer, out = reference
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["step-000009.ckpt", "step-000010.ckpt"]  # saved at 3, 6, 9, 10; the last 2 kept
    state = read_state_dict(str(out / "checkpoints" / "step-000010.ckpt"))
    model = dict(trainer.model.parameters_and_names())
    for name, param in model.items():  # the model, the null caption among it
        np.testing.assert_array_equal(state[name], param.asnumpy(), err_msg=name)
        np.testing.assert_array_equal(state["ema." + name], trainer.ema.state_dict()["ema." + name].asnumpy())
        assert "optimizer." + name + "_m" in state  # CAME's first moment of every weight
    assert int(np.ravel(state["optimizer.global_step"])[0]) == STEPS
    optimizer = {k for k in state if k.startswith("optimizer.")}
    assert optimizer == {"optimizer." + k for k in trainer.train_step.optimizer_params}
    assert int(state["step"]) == STEPS and int(state["epoch"]) == trainer.epoch
    # The data position after step 10's 20 batches, 3 per epoch (the loader thread has read further ahead).
    assert json.loads(state["data_state"]) == trainer.data_state
    assert trainer.data_state == {**trainer.sampler.state_dict(), "epoch": 6, "consumed_batches": 2}
    # Class dropout trained the null caption (diffusers folders do not store it: it starts from the
    # model's initialisation), and the checkpoint has it.
    from pixart.models.pixart_weights import from_pretrained

    initial = from_pretrained(str(out.parent / "pipe" / "transformer"), model_max_length=16)
    assert not np.array_equal(state["y_embedder.y_embedding"], initial.y_embedder.y_embedding.asnumpy())


def test_final_exports_load_for_sampling_and_ema_differs(reference):
    from pixart.models.pixart_weights import from_pretrained

    trainer, out = reference
    model = from_pretrained(str(out / "final" / "model.ckpt"))
    ema = from_pretrained(str(out / "final" / "ema.ckpt"))
    for name, param in trainer.model.parameters_and_names():
        np.testing.assert_array_equal(dict(model.parameters_and_names())[name].asnumpy(), param.asnumpy())
    averages = trainer.ema.state_dict()
    for name, param in ema.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), averages["ema." + name].asnumpy())
    assert model.config == trainer.model.config


def test_validation_images_written_on_rank_0(reference):
    _, out = reference
    image = Image.open(out / "samples" / "step-000005" / "00.png")
    assert image.size == (256, 256) and image.text["prompt"] == "a red house"
    assert np.asarray(image).std() > 1.0


# ----------------------------------------------------------------------------- exact resume


def test_resume_after_sigkill_is_bitwise_exact(reference, tmp_path, tmp_path_factory):
    _, ref_out = reference
    pipe, data = reference_setup(tmp_path_factory)
    out = tmp_path / "run"
    argv = train_argv(pipe, data, out)
    proc = run_train(*argv)
    target = out / "checkpoints" / "step-000003.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: steps 4-10 and the export are not done yet
    log, _ = proc.communicate()
    assert target.exists(), log
    assert not (out / "final").exists(), "the run finished before it could be killed"
    assert json.loads((out / "train.lock").read_text())["pid"] == proc.pid  # a killed run cannot remove it

    resumed = run_train(*argv, "--resume")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert "resumed" in log  # from step 3 or 6, whichever was the latest when it was killed
    assert "removed the stale lock" in log and not (out / "train.lock").exists()  # taken over, then released
    for name in ("model.ckpt", "ema.ckpt"):
        assert_same_arrays(read_state_dict(str(ref_out / "final" / name)), read_state_dict(str(out / "final" / name)))
    # Optimizer state, EMA and data position too.
    last_ref = read_state_dict(str(ref_out / "checkpoints" / "step-000010.ckpt"))
    last = read_state_dict(str(out / "checkpoints" / "step-000010.ckpt"))
    assert_same_arrays(last_ref, last)
    assert last_ref["data_state"] == last["data_state"]


def test_resume_refuses_changed_settings(reference, tmp_path_factory):
    from pixart.train.trainer import Trainer

    pipe, data = reference_setup(tmp_path_factory)
    _, out = reference
    argv = train_argv(pipe, data, out, "--resume", str(out / "checkpoints" / "step-000009.ckpt"), "--seed", "7")
    config = parse_train_config(argv).check()
    with pytest.raises(ConfigError, match="seed 42 -> 7"):
        Trainer(config)


# ----------------------------------------------------------------------------- pieces


def test_ema_update_math_and_exact_swap():
    from pixart.train.ema import EMA

    weights = [("a", ms.Parameter(ms.Tensor(np.array([1.0, 2.0], np.float32)), name="a")),
               ("b", ms.Parameter(ms.Tensor(np.array([[3.0]], np.float32)), name="b"))]
    ema = EMA(weights, decay=0.9)
    weights[0][1].set_data(ms.Tensor(np.array([11.0, -8.0], np.float32)))
    ema()
    np.testing.assert_allclose(ema.state_dict()["ema.a"].asnumpy(), [0.9 * 1 + 0.1 * 11, 0.9 * 2 + 0.1 * -8], rtol=1e-6)
    np.testing.assert_allclose(ema.state_dict()["ema.b"].asnumpy(), [[3.0]])  # unchanged weight, unchanged average
    ema()
    np.testing.assert_allclose(ema.state_dict()["ema.a"].asnumpy()[0], 0.9 * 2.0 + 0.1 * 11, rtol=1e-6)
    with ema.swapped_in():
        np.testing.assert_array_equal(weights[0][1].asnumpy(), ema.state_dict()["ema.a"].asnumpy())
    np.testing.assert_array_equal(weights[0][1].asnumpy(), [11.0, -8.0])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from pixart.train import checkpointing

    path = checkpointing.checkpoint_path(str(tmp_path), 5)

    def failing_save(entries, file, append_dict=None):
        with open(file, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ms, "save_checkpoint", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save_training_checkpoint(path, {"w": np.ones(3, np.float32)}, 5, 0, {}, {}, {})
    assert os.listdir(tmp_path / "checkpoints") == []  # neither the checkpoint nor its temporary file
    monkeypatch.undo()

    stale = tmp_path / "checkpoints" / ".step-000007.ckpt.abc.tmp.ckpt"  # what a SIGKILL mid-save leaves
    stale.write_bytes(b"partial")
    checkpointing.save_training_checkpoint(path, {"w": np.ones(3, np.float32)}, 5, 1, {"epoch": 1}, {"depth": 1},
                                           {"seed": 0})
    assert checkpointing.latest_checkpoint(str(tmp_path)) == path
    checkpointing.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["step-000005.ckpt"]
    tensors, meta = checkpointing.read_training_checkpoint(path)
    assert meta["step"] == 5 and meta["epoch"] == 1 and meta["data_state"] == {"epoch": 1}
    np.testing.assert_array_equal(tensors["w"], np.ones(3))


def test_keep_last(tmp_path):
    from pixart.train import checkpointing

    for step in (1, 2, 10, 11):
        checkpointing.save_training_checkpoint(checkpointing.checkpoint_path(str(tmp_path), step),
                                               {"w": np.zeros(1, np.float32)}, step, 0, {}, {}, {})
    removed = checkpointing.keep_last(str(tmp_path), 2)
    assert [os.path.basename(p) for p in removed] == ["step-000001.ckpt", "step-000002.ckpt"]
    assert [s for s, _ in checkpointing.list_checkpoints(str(tmp_path))] == [10, 11]


def test_learning_rate_schedules_match_host_formula():
    from pixart.train.optim import WarmupSchedule, lr_at, scaled_learning_rate

    assert scaled_learning_rate(2e-5, 1024, "sqrt") == pytest.approx(4e-5)
    for kind in ("constant", "cosine"):
        kwargs = dict(lr=1e-3, warmup_steps=4, schedule=kind, total_steps=20, min_lr=1e-5)
        cell = WarmupSchedule(**kwargs)
        for step in (0, 1, 3, 4, 10, 19, 25):
            got = float(cell(ms.Tensor(step, ms.int32)))
            assert got == pytest.approx(lr_at(step, **kwargs), rel=1e-5), (kind, step)
    assert lr_at(0, 1.0, warmup_steps=4) == 0.25 and lr_at(20, 1.0, 4, "cosine", 20, 0.0) == pytest.approx(0.0)


def test_fp16_loss_scale_halves_on_overflow_and_grows_after_window():
    from pixart.train.step import LossScaler

    scaler = LossScaler(dynamic=True, init_scale=1024.0, window=2)
    for finite, expected in ((True, 1024.0), (True, 2048.0), (False, 1024.0), (True, 1024.0)):
        scaler.update(ms.Tensor(finite))
        assert float(scaler.scale) == expected


def test_bad_records_one_line_error_exit_2_and_skip(tmp_path, tmp_path_factory, capsys):
    from pixart.train.trainer import Trainer

    pipe, _ = reference_setup(tmp_path_factory)
    bad = [{"path": "missing.png", "prompt": "x", "height": 8, "width": 8, "ratio": 1.0},
           {"path": "img0.png", "prompt": "x", "height": 8, "width": 8, "ratio": 3.0}]
    data = make_images(tmp_path / "data", extra_records=bad)
    argv = train_argv(pipe, data, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: 2 of 6 records") and "skip_bad_records" in err

    config = parse_train_config(argv + ["--skip_bad_records", "True"]).check()
    assert len(Trainer(config).dataset) == 4


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    from pixart.data import BucketBatchSampler, TrainDataset, get_bins, load_batch, load_records
    from pixart.train.trainer import BatchStream

    data = make_images(tmp_path / "data", count=6)
    # A valid header (passes validation) with the pixel data cut off: found only when decoded.
    (data / "img3.png").write_bytes((data / "img3.png").read_bytes()[:100])
    records, _ = load_records(str(data / "labels.json"), str(data))
    bins = get_bins(256)
    dataset = TrainDataset(records, str(data), bins)
    sampler = BucketBatchSampler(records, bins, 1, shuffle=False)
    stream = BatchStream(sampler, lambda indices, epoch: load_batch(dataset, indices, epoch))
    try:
        batches = [next(stream) for _ in range(5)]  # one epoch: 6 batches of 1, one unreadable
    finally:
        stream.close()
    assert [b.data["indices"][0] for b in batches] == [0, 1, 2, 4, 5]
    assert [b.skipped for b in batches] == [0, 0, 0, 1, 0]  # counted with the next batch, for the log
    assert [b.data_state["consumed_batches"] for b in batches] == [1, 2, 3, 5, 6]


def test_check_args_fails_fast_with_one_line_errors(tmp_path):
    for extra, message in ((["--batch_size", "0"], "--batch_size must be at least 1"),
                           (["--class_dropout_prob", "1.5"], "--class_dropout_prob must be in"),
                           (["--feature_dir", str(tmp_path / "nope")], "does not exist")):
        config = parse_train_config(["--json_path", "x", "--image_dir", "y", "--image_size", "256", *extra])
        with pytest.raises(ConfigError, match=message):
            config.check()
    config = tmp_path / "bad.yaml"
    config.write_text("lerning_rate: 1\n")
    with pytest.raises(ConfigError, match="did you mean"):
        parse_train_config(["-c", str(config)])


# ----------------------------------------------------------------------------- cached features and LoRA


def reference_features(tmp_path_factory):
    """tools/extract_features.py over the reference images (once per session)."""
    if "features" not in _CACHE:
        from tools.extract_features import main as extract

        pipe, data = reference_setup(tmp_path_factory)
        folder = tmp_path_factory.getbasetemp() / "train_reference" / "features"
        extract(["--json_path", str(data / "labels.json"), "--image_dir", str(data), "--feature_dir", str(folder),
                 "--pretrained_path", str(pipe), "--image_size", "256", "--t5_max_length", "16",
                 "--progress", "False"])
        _CACHE["features"] = folder
    return _CACHE["features"]


def feature_argv(pipe, features, out, *extra):
    """train_argv with the cached features instead of the images."""
    argv = train_argv(pipe, features, out, *extra)
    for flag in ("--json_path", "--image_dir"):
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv + ["--feature_dir", str(features)]


def test_cached_features_train_exactly_like_images(reference, tmp_path, tmp_path_factory):
    # Same latents (same posterior, same ε per record and epoch) and the same caption embeddings on
    # the real tokens: the weights come out bit for bit as from the images, without T5 and the VAE.
    _, ref_out = reference
    pipe, _ = reference_setup(tmp_path_factory)
    trainer = train.main(feature_argv(pipe, reference_features(tmp_path_factory), tmp_path / "out"))
    assert trainer.vae is None and trainer.text_encoder is None  # only the validation prompts were encoded
    for name in ("model.ckpt", "ema.ckpt"):
        assert_same_arrays(read_state_dict(str(ref_out / "final" / name)),
                           read_state_dict(str(tmp_path / "out" / "final" / name)))
    assert (tmp_path / "out" / "samples" / "step-000005" / "00.png").exists()


def test_lora_trains_and_saves_only_adapters(tmp_path, tmp_path_factory):
    from pixart.models.pixart_weights import from_pretrained
    from pixart.models.lora import load_lora, merge_lora

    pipe, _ = reference_setup(tmp_path_factory)
    out = tmp_path / "lora"
    argv = feature_argv(pipe, reference_features(tmp_path_factory), out, "--lora_rank", "4",
                        "--lora_target_modules", "attn.qkv", "cross_attn.proj", "--visualize", "False")
    argv[argv.index("--max_steps") + 1] = "3"
    trainer = train.main(argv)

    geometry = {k: getattr(trainer.model.config, k) for k in ("input_size", "pe_interpolation", "model_max_length")}
    base = from_pretrained(str(pipe / "transformer"), **geometry)
    trained = dict(trainer.model.parameters_and_names())
    for name, param in base.parameters_and_names():  # base weights frozen (the null caption too)
        np.testing.assert_array_equal(trained[name].asnumpy(), param.asnumpy(), err_msg=name)
    state = read_state_dict(str(out / "checkpoints" / "step-000003.ckpt"))
    adapters = sorted(n for n in trained if n.endswith((".lora_A", ".lora_B")))
    assert len(adapters) == 2 * 2 * 2  # 2 blocks × 2 layers × (A, B)
    weights = sorted(k for k in state if not k.startswith(("ema.", "optimizer.", "train.")) and
                     isinstance(state[k], np.ndarray) and k not in ("step", "epoch", "format_version"))
    assert weights == sorted(adapters + ["y_embedder.y_embedding"])
    assert sorted(k[4:] for k in state if k.startswith("ema.")) == adapters

    lora, config = load_lora(str(out / "final" / "lora.safetensors"))
    assert config["rank"] == 4 and sorted(lora) == adapters
    assert any(np.abs(lora[n]).max() > 0 for n in adapters if n.endswith("lora_B"))  # B moved from zero
    load_lora(str(out / "final" / "lora_ema.safetensors"))
    merge_lora(base, str(out / "final" / "lora.safetensors"))  # what sample.py --lora does
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((1, 4, 16, 16)).astype(np.float32))
    t = ms.Tensor(np.array([500], np.int32))
    y = ms.Tensor(rng.standard_normal((1, 16, 32)).astype(np.float32))
    np.testing.assert_allclose(base(x, t, y).asnumpy(), trainer.model(x, t, y).asnumpy(), atol=1e-5)


def test_recompute_gives_the_same_gradients_in_graph_mode():
    """--recompute (cell.recompute() on each block) runs on CPU in the compiled train graph and
    changes memory, not numbers."""
    from pixart.samplers import IDDPMSampler
    from tiny_models import tiny_pixart
    from pixart.train.step import DiffusionLoss, ForwardBackward, LossScaler, draw_step_noise

    rng = np.random.default_rng(0)
    draws = draw_step_noise(0, 0, 0, 2, (4, 8, 8), drop_prob=0.5)
    inputs = (ms.Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32)),
              ms.Tensor(rng.standard_normal((2, 6, 8)).astype(np.float32)), ms.Tensor(np.ones((2, 6), np.int32)),
              ms.Tensor(draws["t"]), ms.Tensor(draws["noise"]), ms.Tensor(draws["drop_ids"]),
              ms.Tensor(np.ones((2, 2), np.float32)), ms.Tensor(np.ones((2, 1), np.float32)))
    results = []
    for recompute in (False, True):
        model = tiny_pixart(model_max_length=6)
        if recompute:
            for block in model.blocks:
                block.recompute()
        weights = [p for _, p in model.parameters_and_names()]
        step = ForwardBackward(DiffusionLoss(model, IDDPMSampler().diffusion), weights, LossScaler())
        loss, _, _, grads = step(*inputs)
        results.append((float(loss), [g.asnumpy() for g in grads]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
