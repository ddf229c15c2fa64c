"""Data contract: FILE.npz[:SPLIT], checks against the model input, casting to its dtype."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.data import Dataset, check_input, load_dataset, parse_spec
from mpqc.core.errors import DataError
from mpqc.core.ir import Value

from tests.conftest import bench_path


@pytest.mark.parametrize("spec, want", [
    ("data.npz:calib", ("data.npz", "calib")),
    ("data.npz", ("data.npz", "eval")),
    ("dir/data.npz:test", ("dir/data.npz", "test")),
    ("/abs/dir/data.npz", ("/abs/dir/data.npz", "eval")),
    ("c:dir/data.npz", ("c:dir/data.npz", "eval")),  # a colon inside the path is not a split
    ("data.npz:", ("data.npz", "eval")),  # empty split: the default
    ("a:b.npz:train", ("a:b.npz", "train")),
])
def test_parse_spec(spec, want):
    assert parse_spec(spec, "eval") == want


@pytest.fixture
def npz(tmp_path):
    def make(name="d.npz", **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return str(p)
    return make


def inp(shape=("N", 1, 4, 4), dtype=np.float32):
    return Value("input", shape, dtype)


def test_default_split_labels_and_cast(npz):
    x = np.random.default_rng(0).random((5, 1, 4, 4))  # float64
    path = npz(x_eval=x, y_eval=np.arange(5), x_calib=x[:2].astype(np.float32))
    ds = load_dataset(path, inp())
    assert ds.source == "d.npz:eval" and len(ds) == 5 and ds.y.tolist() == [0, 1, 2, 3, 4]
    assert ds.x.dtype == np.float32 and ds.x.flags.c_contiguous
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    cal = load_dataset(path, inp(), default_split="calib")
    assert cal.source == "d.npz:calib" and len(cal) == 2 and cal.y is None
    sub = ds.subset(3)
    assert len(sub) == 3 and sub.y.tolist() == [0, 1, 2] and sub.source == "d.npz:eval[:3]"
    assert ds.subset(10) is ds and ds.subset(None) is ds


def test_uint8_is_accepted_and_cast(npz):
    x = np.array([0, 1, 128, 255] * 4, np.uint8).reshape(1, 1, 4, 4)
    ds = load_dataset(npz(x_eval=np.repeat(x, 3, 0)) + ":eval", inp())
    assert ds.x.dtype == np.float32 and ds.x[0, 0, 0].tolist() == [0.0, 1.0, 128.0, 255.0]
    ds = load_dataset(npz("i.npz", x_eval=np.ones((2, 1, 4, 4), np.float32)), inp(dtype=np.int64))
    assert ds.x.dtype == np.int64  # cast to whatever the model input is


def test_bench_photos_uint8_cast_to_float32():
    path = bench_path("photos.npz")
    ds = load_dataset(f"{path}:eval", inp(("N", 3, 224, 224)))
    raw = np.load(path)["x_eval"]
    assert raw.dtype == np.uint8 and ds.x.dtype == np.float32 and ds.x.shape == (96, 3, 224, 224)
    np.testing.assert_array_equal(ds.x, raw.astype(np.float32))
    assert ds.y is not None and len(ds.y) == 96


def test_no_input_value_keeps_dtype(npz):
    ds = load_dataset(npz(x_eval=np.ones((2, 3), np.float64)))
    assert ds.x.dtype == np.float64


@pytest.mark.parametrize("arrays, match", [
    (dict(x_eval=np.ones((2, 4, 4), np.float32)), r"has shape \[2, 4, 4\] \(rank 3\) but model input 'input' "
                                                  r"expects rank 4 \['N', 1, 4, 4\]"),
    (dict(x_eval=np.ones((2, 3, 4, 4), np.float32)), r"expects \['N', 1, 4, 4\] \(dim 1 is 3, expected 1\)"),
    (dict(x_eval=np.full((2, 1, 4, 4), "a")), r"'x_eval' has dtype <U1, expected a numeric array"),
    (dict(x_eval=np.ones((2, 1, 4, 4), np.complex64)), r"dtype complex64, expected a numeric array"),
    (dict(x_eval=np.array([None, 1], dtype=object)), r"cannot read 'x_eval'"),
    (dict(x_eval=np.full((2, 1, 4, 4), np.nan, np.float32)), r"contains 32 NaN or infinite values"),
    (dict(x_eval=np.array([[[[np.inf]]]], np.float64).repeat(4, 2).repeat(4, 3)), r"contains 16 NaN or infinite"),
    (dict(x_eval=np.ones((0, 1, 4, 4), np.float32)), r"'x_eval' is empty"),
    (dict(x_eval=np.ones((3, 1, 4, 4), np.float32), y_eval=np.arange(2)), r"'y_eval' has 2 entries but 'x_eval' has 3"),
    (dict(x_eval=np.ones((2, 1, 4, 4), np.float32), y_eval=np.array([0.0, np.nan])), r"'y_eval' contains NaN"),
    (dict(x_calib=np.ones((2, 1, 4, 4), np.float32), x_test=np.ones((2, 1, 4, 4))),
     r"has no array 'x_eval' for split 'eval'; splits present: calib, test"),
    (dict(images=np.ones((2, 1, 4, 4))), r"splits present: none \(keys must be x_SPLIT / y_SPLIT\)"),
])
def test_bad_arrays(npz, arrays, match):
    path = npz(**arrays)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(path, inp())
    assert str(e.value).startswith("--data")
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"--calib: data file '.*nope.npz' does not exist"):
        load_dataset(str(tmp_path / "nope.npz") + ":calib", inp(), option="--calib")
    txt = tmp_path / "text.npz"
    txt.write_text("not a zip file\n")
    with pytest.raises(DataError, match=r"text.npz' is not a readable .npz file"):
        load_dataset(str(txt), inp())
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.ones((2, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"is a single array, expected an .npz with x_eval"):
        load_dataset(str(single), inp())
    with pytest.raises(DataError, match=r"'.*' has no array 'x_train'"):
        np.savez(tmp_path / "ok.npz", x_eval=np.ones((1, 1, 4, 4)))
        load_dataset(str(tmp_path / "ok.npz") + ":train", inp())


def test_check_input_in_memory():
    x = check_input(np.arange(32, dtype=np.int32).reshape(2, 1, 4, 4), inp(), "array")
    assert x.dtype == np.float32 and x[1, 0, 3, 3] == 31
    with pytest.raises(DataError, match=r"^array has shape \[2, 16\]"):
        check_input(np.ones((2, 16)), inp(), "array")
    assert isinstance(Dataset(x, None, "s"), Dataset)
