"""Hugging Face repo ids as --pretrained_path: read from the HF cache offline (no network),
downloaded when online, and a one-line error saying what to download when neither works."""
import os
import socket
import subprocess
import sys

import pytest

from pixart.utils import hub
from pixart.utils.errors import CheckpointError
from tiny_models import make_pipeline_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """An HF_HOME whose hub cache holds REPO (a tiny diffusers PixArt-Σ pipeline) as huggingface_hub
    lays it out: models--owner--name/refs/main naming a snapshots/<commit>/ folder."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    make_pipeline_folder(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_offline_cache_resolves_without_network(hf_home, no_network, monkeypatch):
    snapshot = hf_home / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT
    cache = str(hf_home / "hub")
    assert hub.resolve_pretrained(REPO, cache_dir=cache) == str(snapshot)
    assert hub.resolve_pretrained(f"{REPO}/vae", cache_dir=cache) == str(snapshot / "vae")
    assert hub.resolve_pretrained(f"{REPO}/transformer/config.json", cache_dir=cache) == \
        str(snapshot / "transformer" / "config.json")
    assert hub.display_name(str(snapshot)) == REPO
    # the Python API: PixArtSigmaPipeline.from_pretrained takes the repo id (default HF cache here)
    import huggingface_hub
    from pixart.pipelines.pixart_pipeline import PixArtSigmaPipeline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    pipe = PixArtSigmaPipeline.from_pretrained(REPO)
    assert pipe.transformer.config.input_size == 32 and pipe.schedule["num_train_timesteps"] == 1000
    local = str(snapshot / "vae")
    assert hub.resolve_pretrained(local) == local  # local paths are returned as they are
    with pytest.raises(CheckpointError) as err:
        hub.resolve_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", cache_dir=cache, what="--pretrained_path")
    message = str(err.value)
    assert "\n" not in message and "not in the HF cache while HF_HUB_OFFLINE=1 is set" in message
    assert "huggingface-cli download PixArt-alpha/PixArt-Sigma-XL-2-2K-MS" in message


def test_local_looking_paths_stay_local_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert not hub.is_repo_id("models/PixArt-Sigma-XL-2-1024-MS")  # its first folder exists here
    assert not hub.is_repo_id("./a/b") and not hub.is_repo_id("/a/b") and hub.is_repo_id(REPO)
    with pytest.raises(CheckpointError, match=r"^models/nope not found \(--pretrained_path\)"):
        hub.resolve_pretrained("models/nope", what="--pretrained_path")


def test_sample_py_runs_from_a_repo_id_offline(hf_home, tmp_path):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HF_HUB_CACHE", None)
    common = [sys.executable, os.path.join(ROOT, "sample.py"), "--prompt", "a red car", "--sampling_steps", "1",
              "--image_width", "64", "--image_height", "64", "--mode", "pynative"]
    result = subprocess.run(common + ["--pretrained_path", REPO, "--output_path", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    image = Image.open(tmp_path / "out" / "00000.png")
    assert image.size == (64, 64) and image.text["model"] == REPO
    missing = subprocess.run(common + ["--pretrained_path", "PixArt-alpha/PixArt-Sigma-XL-2-4K-MS"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "error: --pretrained_path PixArt-alpha/PixArt-Sigma-XL-2-4K-MS: not a local path" in missing.stderr
    assert "huggingface-cli download PixArt-alpha/PixArt-Sigma-XL-2-4K-MS" in missing.stderr


def test_online_download_fetches_one_format_and_reports_missing_repos(tmp_path, monkeypatch):
    """Online, the repo is fetched with huggingface_hub.snapshot_download (its progress bars on),
    skipping .bin files where the folder has safetensors; a repo that does not exist is one line."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    files = ["model_index.json", "transformer/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.bin"]

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id.endswith("missing"):
            raise RepositoryNotFoundError("404")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: files)
    assert hub.resolve_pretrained(REPO) == str(tmp_path)
    repo_id, kwargs = calls[0]
    assert repo_id == REPO and kwargs["local_files_only"] is False and kwargs["allow_patterns"] is None
    assert "text_encoder/pytorch_model.bin" in kwargs["ignore_patterns"]
    assert "vae/diffusion_pytorch_model.bin" not in kwargs["ignore_patterns"]  # vae/ has only the .bin
    assert kwargs.get("tqdm_class") is None and not are_progress_bars_disabled()
    (tmp_path / "vae").mkdir()
    assert hub.resolve_pretrained(f"{REPO}/vae") == str(tmp_path / "vae")
    assert calls[1][1]["allow_patterns"] == ["vae/*"]
    with pytest.raises(CheckpointError) as err:
        hub.resolve_pretrained("PixArt-alpha/missing", what="--pretrained_path")
    assert str(err.value) == ("--pretrained_path PixArt-alpha/missing: not a local path, and the Hugging Face repo "
                              "PixArt-alpha/missing does not exist on huggingface.co (or is private: log in with "
                              "huggingface-cli login)")
