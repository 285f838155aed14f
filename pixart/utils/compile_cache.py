"""MindSpore's graph compile cache, made safe for more than one input shape.

MindSpore (2.7) stores compiled graphs as ``compile_cache_<n>.mindir``, ``n`` counting the graphs
compiled in a process, and reloads graph ``n`` for the ``n``-th compile of a later process without
checking its inputs: a run that compiles its shapes in another order gets a graph for the wrong
shape (measured: a (16, 64) latent came back (32, 32)). So every graph signature (architecture,
dtypes, input shapes, our source code, MindSpore's version) gets a folder of its own; a later run
with the same signature loads its graph instead of compiling (XL-2 at 256²: 24-50 s saved), and
any other signature misses and compiles, never loading a foreign graph.
"""
import hashlib
import json
import os

DEFAULT_ROOT = os.environ.get("PIXART_COMPILE_CACHE", os.path.join("~", ".cache", "pixart", "compile"))
_SOURCE_HASH = None


def resolve_root(root):
    """``root`` as an absolute folder, or None for "none" / "" (the cache off)."""
    if root is None or str(root).lower() in ("", "none", "off", "false"):
        return None
    return os.path.abspath(os.path.expanduser(str(root)))


def source_hash():
    """A hash of the package's Python sources: graphs cached by other code are never reused."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        digest = hashlib.sha1()
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for folder, _, files in sorted(os.walk(package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), "rb") as f:
                        digest.update(name.encode() + f.read())
        _SOURCE_HASH = digest.hexdigest()
    return _SOURCE_HASH


def use_graph_cache(root, signature):
    """Point MindSpore's compile cache at the folder of ``signature`` (JSON-serialisable) under
    ``root``; returns that folder. Call before the first call of a graph with these inputs."""
    import mindspore as ms

    key = json.dumps({"signature": signature, "source": source_hash(), "mindspore": ms.__version__},
                     sort_keys=True, default=str)
    folder = os.path.join(root, hashlib.sha1(key.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    ms.set_context(enable_compile_cache=True, compile_cache_path=folder)
    return folder
