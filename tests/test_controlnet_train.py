"""train.py --controlnet on tiny models (CPU): Canny control images from tools/make_control_images.py,
only the ControlNet branch trains, the loss on the training data falls, resume is bitwise exact, the
export loads for sampling; one-line errors."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

import mindspore as ms

import train
from pixart.utils.checkpoint import read_state_dict
from pixart.utils.errors import ConfigError
from test_train import make_images
from tiny_models import make_pipeline_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_control_images.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cntrain")
    pipe = make_pipeline_folder(root / "pipe", "sigma", sample_size=32)
    data = make_images(root / "data")
    result = run_tool("--json_path", data / "labels.json", "--image_dir", data, "--low_threshold", 50,
                      "--high_threshold", 150)
    assert result.returncode == 0, result.stderr
    return pipe, data


def argv(pipe, data, out, *extra, steps=STEPS):
    return ["--pretrained_path", str(pipe), "--json_path", str(data / "labels_control.json"), "--image_dir",
            str(data), "--image_size", "256", "--t5_max_length", "16", "--batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_steps", str(steps), "--optim", "adamw",
            "--start_learning_rate", "3e-3", "--warmup_steps", "1", "--class_dropout_prob", "0.25",
            "--ema_rate", "0.9", "--log_loss_interval", "1", "--ckpt_save_interval", "2", "--ckpt_max_keep", "0",
            "--controlnet", "--controlnet_layers", "1", "--output_path", str(out), *extra]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    pipe, data = setup
    out = tmp_path_factory.mktemp("cnref")
    return train.main(argv(pipe, data, out)), out


def test_tool_writes_canny_edges_and_records(setup, tmp_path):
    _, data = setup
    records = json.loads((data / "labels_control.json").read_text())
    assert [r["control"] for r in records] == [f"canny/img{i}.png" for i in range(4)]
    source = np.asarray(Image.open(data / "img1.png").convert("RGB"))
    edges = np.asarray(Image.open(data / records[1]["control"]))
    expected = cv2.Canny(cv2.cvtColor(source, cv2.COLOR_RGB2GRAY), 50, 150)
    assert edges.shape == source.shape and expected.any() and not expected.all()
    np.testing.assert_array_equal(edges[..., 0], expected)
    single = tmp_path / "edges.png"
    assert run_tool("--image", data / "img0.png", "--output", single).returncode == 0
    assert Image.open(single).size == Image.open(data / "img0.png").size
    bad = run_tool("--image", data / "img0.png", "--output", single, "--low_threshold", 200, "--high_threshold", 100)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: need 0 <= --low_threshold")


def test_only_the_branch_trains_and_the_loss_falls(reference, setup):
    from pixart.models.pixart_weights import from_pretrained
    from pixart.train.step import DiffusionLoss
    from pixart.train.trainer import Batch

    trainer, out = reference
    pipe, _ = setup
    base = from_pretrained(str(pipe / "transformer"), model_max_length=16, input_size=32, pe_interpolation=0.5)
    for name, param in base.parameters_and_names():  # the DiT is frozen
        np.testing.assert_array_equal(dict(trainer.model.parameters_and_names())[name].asnumpy(), param.asnumpy())
    assert sorted({n.split(".")[0] for n, _ in trainer.trained}) == ["controlnet"]
    assert all(".copied_block." in n or n.split(".")[2] in ("before_proj", "after_proj") for n, _ in trainer.trained)

    # IDDPM loss on the training images with fixed draws (t, ε): the trained branch against a
    # zero branch (= the base model, where training started).
    loss_fn = DiffusionLoss(trainer.net, trainer.train_step.diffusion)
    after_proj = [p for n, p in trainer.trained if ".after_proj." in n]

    def data_loss():
        losses = []
        for step, indices in enumerate([[0, 2], [1, 3]] * 4):
            trainer.step = 10_000 + step
            data, _ = trainer._load(indices, 0)
            inputs = trainer._inputs(Batch(data, 0, 0, {}), 0)
            losses.append(float(loss_fn(*inputs[:8], ms.Tensor(1.0), inputs[8])[1]))
        return np.mean(losses)

    trained_loss = data_loss()
    for p in after_proj:
        p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)))
    base_loss = data_loss()
    assert trained_loss < 0.9 * base_loss, (trained_loss, base_loss)
    assert (out / "checkpoints" / "step-000002.ckpt").exists() and (out / "final" / "controlnet.ckpt").exists()


def test_resume_is_bitwise_exact_and_export_samples(reference, setup, tmp_path):
    from pixart import PixArtSigmaPipeline

    _, ref_out = reference
    pipe, data = setup
    out = tmp_path / "run"
    train.main(argv(pipe, data, out, steps=2))  # stops after step 2 ...
    train.main(argv(pipe, data, out, "--resume"))  # ... and continues to step 4
    for name in ("checkpoints/step-000004.ckpt", "final/controlnet.ckpt", "final/controlnet_ema.ckpt"):
        ref, run = read_state_dict(str(ref_out / name)), read_state_dict(str(out / name))
        keys = [k for k in ref if isinstance(ref[k], np.ndarray) and k != "format_version"]
        assert any(k.startswith("controlnet.") for k in keys) and not any(k.startswith("blocks.") for k in keys)
        for key in keys:
            np.testing.assert_array_equal(ref[key], run[key], err_msg=f"{name}: {key}")
    ema, model = (read_state_dict(str(ref_out / "final" / f)) for f in ("controlnet_ema.ckpt", "controlnet.ckpt"))
    assert np.abs(ema["controlnet.0.after_proj.weight"] - model["controlnet.0.after_proj.weight"]).max() > 0
    assert np.abs(model["controlnet.0.after_proj.weight"]).max() > 0  # moved from zero
    # sample.py --controlnet reads the export
    pipeline = PixArtSigmaPipeline.from_pretrained(str(pipe), controlnet=str(ref_out / "final" / "controlnet.ckpt"))
    image = pipeline("a red house", control_image=str(data / "canny" / "img0.png"), num_inference_steps=2, seed=0,
                     progress=False).images[0]
    assert image.size == (48, 48)


def test_bad_controlnet_training_input(setup, tmp_path):
    from pixart.train.config import parse_train_config

    pipe, data = setup
    with pytest.raises(ConfigError, match="lack one: #0 \\(img0.png\\): no 'control' image path"):
        train.main(argv(pipe, data, tmp_path / "a", "--json_path", str(data / "labels.json")))
    with pytest.raises(ConfigError, match="cannot be combined with --lora_rank"):
        parse_train_config(argv(pipe, data, tmp_path / "b", "--lora_rank", "4")).check()
    records = json.loads((data / "labels_control.json").read_text())
    records[0]["control"] = "canny/missing.png"
    (data / "broken.json").write_text(json.dumps(records))
    with pytest.raises(ConfigError, match="control image not found: canny/missing.png"):
        train.main(argv(pipe, data, tmp_path / "c", "--json_path", str(data / "broken.json")))


def test_cached_features_train_exactly_like_images(reference, setup, tmp_path):
    """tools/extract_features.py stores the hint latents too; training from them gives the
    on-the-fly run's ControlNet bit for bit."""
    from tools.extract_features import main as extract

    _, ref_out = reference
    pipe, data = setup
    features = tmp_path / "features"
    extract(["--json_path", str(data / "labels_control.json"), "--image_dir", str(data), "--feature_dir",
             str(features), "--pretrained_path", str(pipe), "--image_size", "256", "--t5_max_length", "16",
             "--progress", "False"])
    index = json.loads((features / "index.json").read_text())
    assert all(r["control_file"].startswith("control/") for r in index["records"])
    args = argv(pipe, data, tmp_path / "out")
    for flag in ("--json_path", "--image_dir"):
        del args[args.index(flag):args.index(flag) + 2]
    trainer = train.main(args + ["--feature_dir", str(features)])
    assert trainer.vae is None
    for name in ("controlnet.ckpt", "controlnet_ema.ckpt"):
        ref, run = read_state_dict(str(ref_out / "final" / name)), read_state_dict(str(tmp_path / "out" / "final" / name))
        keys = [k for k in ref if k.startswith("controlnet.")]
        assert keys
        for key in keys:
            np.testing.assert_array_equal(ref[key], run[key], err_msg=f"{name}: {key}")
