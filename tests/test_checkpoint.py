"""The checkpoint loader: every format round-trips exactly, unsafe pickles never run."""
import json
import os
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest
import torch
from mindspore import nn

from pixart.utils.checkpoint import (load_into_cell, read_state_dict, read_torch_pickle, save_ckpt,
                                     save_safetensors, unwrap_state_dict)
from pixart.utils.errors import CheckpointError


def _torch_state():
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        a=torch.randn(2, 3, generator=g),
        b=torch.randn(4, generator=g).half(),
        c=torch.randn(3, 5, generator=g).bfloat16().t(),  # non-contiguous view
        d=torch.nn.Parameter(torch.randn(2, generator=g)),
    )


def _assert_same(ref, got):
    assert set(ref) <= set(got)
    for k, v in ref.items():
        expected = v.detach().float().numpy()
        actual = np.asarray(got[k]).astype(np.float32)
        assert actual.shape == expected.shape, k
        np.testing.assert_array_equal(actual, expected)


def test_pth_read_without_torch_matches(tmp_path):
    ref = _torch_state()
    # the layout of the official PixArt save_checkpoint
    torch.save({"state_dict": ref, "state_dict_ema": {"a": ref["a"] * 2}, "optimizer": {"state": {}},
                "scheduler": {"last_epoch": 7}, "epoch": 7}, tmp_path / "m.pth")
    obj = read_state_dict(str(tmp_path / "m.pth"))
    assert obj["epoch"] == 7 and obj["scheduler"] == {"last_epoch": 7}
    _assert_same(ref, unwrap_state_dict(obj))
    np.testing.assert_array_equal(unwrap_state_dict(obj, use_ema=True)["a"], ref["a"].numpy() * 2)
    assert unwrap_state_dict(obj)["c"].dtype == ml_dtypes.bfloat16
    # an "ema" entry and this project's flat "ema.*" tensors are EMA weights too
    assert unwrap_state_dict({"state_dict": {"a": 1}, "ema": {"a": 2}}, use_ema=True) == {"a": 2}
    assert unwrap_state_dict({"w": 1, "ema.w": 3, "step": 5}, use_ema=True) == {"w": 3}
    with pytest.raises(CheckpointError, match=r"^m.pth has no EMA weights .*it holds: state_dict, epoch\. Drop"):
        unwrap_state_dict({"state_dict": {"a": 1}, "epoch": 2}, use_ema=True, source="m.pth")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to load .*system"):
        read_torch_pickle(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_legacy_or_garbage_pth_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        read_state_dict(str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(str(tmp_path / "nope.ckpt"))


def test_safetensors_roundtrip_readable_by_reference(tmp_path):
    from safetensors.torch import load_file

    ref = _torch_state()
    state = {k: v.detach().contiguous() for k, v in ref.items()}
    arrays = unwrap_state_dict(read_state_dict(_save_pth(tmp_path, state)))
    save_safetensors(arrays, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    back = load_file(str(tmp_path / "w.safetensors"))
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        assert torch.equal(back[k], v)
    _assert_same(ref, read_state_dict(str(tmp_path / "w.safetensors")))


def _save_pth(tmp_path, state):
    torch.save(state, tmp_path / "s.pth")
    return str(tmp_path / "s.pth")


def test_sharded_safetensors_folder(tmp_path):
    from safetensors.torch import save_file

    ref = _torch_state()
    items = {k: v.detach().contiguous() for k, v in ref.items()}
    save_file({"a": items["a"], "b": items["b"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"c": items["c"], "d": items["d"]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same(ref, read_state_dict(str(tmp_path)))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shards that are missing"):
        read_state_dict(str(tmp_path))


def test_ckpt_roundtrip_is_exact_and_atomic(tmp_path):
    state = {"w": np.random.randn(3, 4).astype(np.float32),
             "h": np.random.randn(5).astype(np.float16),
             "b": np.random.randn(2, 2).astype(ml_dtypes.bfloat16)}
    path = str(tmp_path / "m.ckpt")
    save_ckpt(state, path, extra={"step": 12})
    back = read_state_dict(path)
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    assert int(back["step"]) == 12
    assert sorted(os.listdir(tmp_path)) == ["m.ckpt"]  # no temporary left behind


class _Tiny(nn.Cell):
    def __init__(self):
        super().__init__()
        self.fc = nn.Dense(3, 2)


def test_load_into_cell_lists_every_problem():
    cell = _Tiny()
    good = {"fc.weight": np.ones((2, 3), np.float32), "fc.bias": np.full((2,), 2, np.float16)}
    load_into_cell(cell, good)
    np.testing.assert_array_equal(cell.fc.bias.asnumpy(), [2, 2])
    bad = {"fc.weight": np.ones((3, 3), np.float32), "extra": np.ones(1, np.float32)}
    with pytest.raises(CheckpointError) as err:
        load_into_cell(cell, bad, source="x.ckpt")
    msg = str(err.value)
    assert "x.ckpt does not fit the model" in msg
    assert "1 missing (fc.bias)" in msg and "1 unexpected (extra)" in msg
    assert "fc.weight (3, 3) vs model (2, 3)" in msg
    np.testing.assert_array_equal(cell.fc.weight.asnumpy(), np.ones((2, 3)))  # nothing half-loaded


def test_file_tensors_of_the_parameter_dtype_are_adopted_without_a_copy_and_never_written_back(tmp_path):
    """T5's loader maps safetensors copy-on-write: a parameter of the stored dtype uses the mapped
    pages (no second copy of T5-XXL), writes to it stay in the process, other dtypes are converted."""
    import functools

    import mindspore as ms

    from pixart.models.t5 import _MappedTensor
    from pixart.utils.checkpoint import read_safetensors, save_safetensors, to_tensor

    data = np.arange(32, dtype=np.float32).reshape(4, 8)
    path = str(tmp_path / "w.safetensors")
    save_safetensors({"w": data}, path)
    before = open(path, "rb").read()
    shared_map = functools.lru_cache(maxsize=1)(functools.partial(read_safetensors, path, copy_on_write=True))
    lazy = _MappedTensor(path, "w", data.shape, data.dtype, shared_map)
    tensor = to_tensor(lazy, ms.float32)
    assert np.shares_memory(tensor.asnumpy(), shared_map()["w"])  # adopted, not copied
    param = ms.Parameter(tensor, name="w")
    ms.ops.assign(param, ms.Tensor(np.zeros((4, 8), np.float32)))
    assert not param.asnumpy().any() and open(path, "rb").read() == before  # the file is untouched
    half = to_tensor(lazy, ms.float16)  # another dtype: a converted copy
    assert half.dtype == ms.float16 and not np.shares_memory(half.asnumpy(), shared_map()["w"])
    np.testing.assert_array_equal(half.asnumpy(), data.astype(np.float16))


def test_load_into_cell_copies_unless_told_to_adopt(tmp_path):
    """By default a state dict is copied (loading it twice never aliases); ``adopt=True`` takes
    writable arrays of the parameter dtype as they are, and still copies read-only file views."""
    import mindspore as ms
    from mindspore import nn

    from pixart.utils.checkpoint import read_safetensors, save_safetensors

    class Cell(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = ms.Parameter(ms.Tensor(np.zeros((4, 8), np.float32)), name="w")

    data = np.arange(32, dtype=np.float32).reshape(4, 8)
    path = str(tmp_path / "w.safetensors")
    save_safetensors({"w": data}, path)
    for state, adopt, shared in ((read_safetensors(path), False, False),
                                 (read_safetensors(path, copy_on_write=True), False, False),
                                 (read_safetensors(path), True, False),  # read-only map: copied
                                 (read_safetensors(path, copy_on_write=True), True, True)):
        cell = Cell()
        load_into_cell(cell, state, adopt=adopt)
        np.testing.assert_array_equal(cell.w.asnumpy(), data)
        assert np.shares_memory(cell.w.asnumpy(), state["w"]) == shared, (adopt, shared)
    owned = {"w": data.copy()}
    cell = Cell()
    load_into_cell(cell, owned, adopt=True)
    assert np.shares_memory(cell.w.asnumpy(), owned["w"])
