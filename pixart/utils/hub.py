"""Hugging Face Hub repo ids as weights paths: ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`` -> a local folder.

    folder = resolve_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")      # whole repo
    vae = resolve_pretrained("PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers/vae")   # one folder of it

A local path is returned as it is. A repo id is looked up through huggingface_hub: from the local
HF cache (``HF_HOME`` / ``HF_HUB_CACHE``) without any network access when ``HF_HUB_OFFLINE=1`` (or
when huggingface.co cannot be reached and the repo is cached), otherwise downloaded into that
cache with huggingface_hub's progress bars. Only one weights format per folder is fetched
(safetensors when the folder has them). Failures are one-line CheckpointErrors that say what to
download.
"""
import logging
import os
import re

from pixart.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

# owner/name, optionally followed by a path inside the repo (a folder, or a file)
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<sub>[\w./-]+))?$")
_WEIGHT_FILE = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Never needed here: other frameworks' weights, images and docs of model cards.
_IGNORE = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.png", "*.jpg", "*.jpeg", "*.gif",
           "*.md", "*.mlmodel", "*.gguf"]


def is_repo_id(path):
    """True for "owner/name[/sub/path]" that is not a local path (its first component is not a
    local folder either, so a mistyped ``models/xyz`` stays a local-path error)."""
    path = os.fspath(path)
    if os.path.exists(path) or path.startswith((".", "/", "~")) or not _REPO_ID.match(path):
        return False
    return not os.path.isdir(path.split("/", 1)[0])


def offline():
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/ON/YES/TRUE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def resolve_pretrained(path_or_repo_id, revision=None, cache_dir=None, what="weights"):
    """A local folder (or file) for a local path or a Hugging Face repo id.

    Args:
        path_or_repo_id: a local path (returned unchanged if it exists), ``owner/name`` (the
            whole repo, e.g. a diffusers PixArt pipeline), ``owner/name/folder`` (one folder, e.g.
            ``.../vae``) or ``owner/name/file.pth`` (one file).
        revision: branch, tag or commit (default: main).
        cache_dir: the HF cache (default: huggingface_hub's, from HF_HOME / HF_HUB_CACHE).
        what: what the path is for, in messages (e.g. "--pretrained_path").

    Raises CheckpointError (one line) for a missing local path, a repo that does not exist, or a
    repo that is not cached while offline.
    """
    path = os.fspath(path_or_repo_id)
    if os.path.exists(path):
        return path
    if not is_repo_id(path):
        raise CheckpointError(f"{path} not found ({what}): give a local folder or a Hugging Face repo id such as "
                              "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    match = _REPO_ID.match(path)
    repo_id, sub = match["repo"], (match["sub"] or "").strip("/")
    try:
        import huggingface_hub
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise CheckpointError(f"{path} is not a local path, and huggingface_hub (pip install huggingface_hub) is "
                              "needed to read it as a Hugging Face repo id") from None
    download = f"huggingface-cli download {repo_id}" + (f" --include '{sub}/*'" if sub and not _is_file(sub) else "")
    local_only = offline()
    try:
        if _is_file(sub):
            return huggingface_hub.hf_hub_download(repo_id, sub, revision=revision, cache_dir=cache_dir,
                                                   local_files_only=local_only)
        allow, ignore = ([f"{sub}/*"] if sub else None), list(_IGNORE)
        if not local_only:
            ignore += _duplicate_formats(huggingface_hub, repo_id, revision, sub)
            logger.info("%s: fetching %s from huggingface.co into the HF cache (files already there are kept)",
                        what, path)
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                   allow_patterns=allow, ignore_patterns=ignore,
                                                   local_files_only=local_only)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        kind = "is gated: accept its licence on huggingface.co and log in (huggingface-cli login)" \
            if isinstance(err, GatedRepoError) else "does not exist on huggingface.co (or is private: log in with " \
            "huggingface-cli login)"
        raise CheckpointError(f"{what} {path}: not a local path, and the Hugging Face repo {repo_id} {kind}") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{what} {path}: the Hugging Face repo {repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE=1 is set" if local_only else "huggingface.co could not be reached"
        raise CheckpointError(f"{what} {path}: not a local path, and the Hugging Face repo {repo_id} is not in the "
                              f"HF cache while {reason}: download it first with `{download}` (or unset "
                              "HF_HUB_OFFLINE), or pass a local folder") from None
    except Exception as err:  # network or cache trouble: say what to do, not a traceback
        raise CheckpointError(f"{what} {path}: could not fetch the Hugging Face repo {repo_id} "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); download "
                              f"it with `{download}` or pass a local folder") from None
    result = os.path.join(folder, sub) if sub else folder
    if not os.path.exists(result):
        raise CheckpointError(f"{what} {path}: the Hugging Face repo {repo_id} has no {sub}/")
    return result


def display_name(path):
    """"owner/name[/sub]" for a folder inside the HF cache (models--owner--name/snapshots/<rev>/sub),
    else the folder's own name: what PNG metadata calls the model."""
    parts = os.path.normpath(os.fspath(path)).split(os.sep)
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return "/".join([part[len("models--"):].replace("--", "/", 1)] + parts[i + 3:])
    return os.path.basename(os.path.normpath(os.fspath(path)))


def _is_file(sub):
    return bool(sub) and sub.endswith(_WEIGHT_FILE + (".json", ".model", ".txt", ".yaml"))


def _duplicate_formats(huggingface_hub, repo_id, revision, sub):
    """Ignore patterns for .bin / .pth / .pt files in folders that also have .safetensors (repos
    often carry both; one is enough). [] when the listing cannot be fetched."""
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception:
        return []
    if sub:
        files = [f for f in files if f.startswith(sub + "/")]
    with_safetensors = {os.path.dirname(f) for f in files if f.endswith(".safetensors")}
    # exact names: a pattern such as "*.bin" would also match other folders' files
    return [f for f in files if f.endswith((".bin", ".pth", ".pt")) and os.path.dirname(f) in with_safetensors]
