"""The one safetensors reader and the one dtype table, against the libraries they stand in for:
safetensors' own reader for the records and bytes, torch for dtype names, sizes and bf16 rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmtune.adapters.manifest import MergedManifest, read_merged_manifest
from vlmtune.io import DamagedFileError, dtypes, read_file, read_json, read_tensors


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A safetensors file with every dtype torch can save that the table knows, odd shapes included."""
    folder = tmp_path_factory.mktemp("io")
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "w.f16": torch.randn(3, 4, 2, generator=gen).to(torch.float16),
        "w.f32": torch.randn(6, generator=gen),
        "w.f64": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "i.i64": torch.arange(10).reshape(2, 5),
        "i.i8": torch.arange(-4, 4, dtype=torch.int8),
        "u.u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "b.bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = folder / "sample.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_records_match_the_safetensors_library(sample):
    path, tensors = sample
    records = read_file(path)
    assert set(records) == set(tensors)
    with safe_open(str(path), "pt") as f:
        for name, r in records.items():
            ref = f.get_tensor(name)
            assert r.shape == tuple(ref.shape)
            assert r.dtype == dtypes.from_torch(ref.dtype)
            assert r.nbytes == ref.numel() * ref.element_size()
            assert torch.equal(r.torch(), ref)
            if ref.dtype.is_floating_point:
                np.testing.assert_array_equal(r.numpy(), ref.float().numpy())
            else:
                np.testing.assert_array_equal(r.numpy(), ref.numpy())
    starts = [r.start for r in records.values()]
    assert starts == sorted(starts), "records come in data order"


def test_read_rows_is_a_slice_of_the_whole(sample):
    path, _ = sample
    r = read_file(path)["w.bf16"]
    whole = r.read()
    assert r.read(rows=(2, 5)) == whole[2 * r.row_bytes : 5 * r.row_bytes]
    assert r.read(rows=(0, r.rows)) == whole and r.read(rows=(3, 3)) == b""
    assert r.as_bytes().read(rows=(1, 4)) == whole[1:4]
    with pytest.raises(IndexError, match="rows 5:8"):
        r.read(rows=(5, 8))


def test_pickled_records_read_like_safetensors(sample, tmp_path):
    _, tensors = sample
    torch.save({k: v for k, v in tensors.items() if k != "scalar"}, tmp_path / "x.bin")
    records = read_tensors(tmp_path / "x.bin")
    for name, r in records.items():
        assert torch.equal(r.torch(), tensors[name]), name
    r = records["w.bf16"]
    assert r.read(rows=(1, 3)) == r.read()[r.row_bytes : 3 * r.row_bytes]


def test_dtype_table_agrees_with_torch():
    for d in dtypes.TABLE.values():
        t = getattr(torch, d.torch)
        assert torch.empty(0, dtype=t).element_size() == d.itemsize, d.code
        assert t.is_floating_point == (d.is_float or d.code.startswith("F8")), d.code
        if d.is_float:
            assert 1 - np.log2(torch.finfo(t).eps) == d.precision_bits, d.code
            assert np.log2(torch.finfo(t).tiny) == d.min_exponent, d.code
    assert [dtypes.parse_name(n) for n in ("auto", "bf16", "FP16", "torch.float32", "half")] == [
        None,
        "BF16",
        "F16",
        "F32",
        "F16",
    ]
    assert dtypes.torch_dtype("bf16") is torch.bfloat16 and dtypes.torch_dtype("auto") == "auto"
    with pytest.raises(dtypes.DTypeError, match="'int8' is not one of auto, bf16, fp16, fp32"):
        dtypes.parse_name("int8")


def test_bf16_rounding_matches_torch():
    """Round to nearest even, ties, subnormals, overflow to inf and NaN, as torch's .to(bfloat16)."""
    gen = np.random.default_rng(0)
    bits = gen.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000, 0x80018000, 0x7FC00001], np.uint32)
    x = np.concatenate([bits, special]).view(np.float32)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = dtypes.bf16_round(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    widened = np.empty(x.shape, np.float32)
    dtypes.bf16_widen(got, widened)
    assert np.isnan(widened[nan]).all()
    np.testing.assert_array_equal(
        widened[~nan], torch.from_numpy(x[~nan].copy()).to(torch.bfloat16).float().numpy()
    )
    # the float64 round trip used by the merge check rounds the same way
    np.testing.assert_array_equal(dtypes.round_trip(x[~nan].astype(np.float64), "BF16"), widened[~nan])


def test_read_json_refuses_non_objects(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    assert read_json(tmp_path / "a.json") == {"x": 1}
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(DamagedFileError, match=r"b\.json holds a JSON list, not an object"):
        read_json(tmp_path / "b.json")
    (tmp_path / "c.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(DamagedFileError, match=r"c\.json is not a text"):
        read_json(tmp_path / "c.json")


def test_merged_manifest_round_trips(tmp_path):
    data = {
        "format": "vlmtune-merged/1",
        "created": "2026-01-01T00:00:00+00:00",
        "base": {
            "name_or_path": "b",
            "fingerprint": "sha256:0",
            "architecture": "A",
            "model_type": "m",
            "family": "f",
            "key_layout": "original",
        },
        "adapters": [
            {
                "path": "a",
                "format": "peft",
                "key_layouts": ["runtime"],
                "sha256": "0" * 64,
                "made_for": None,
                "lora_modules": 2,
                "full_tensors": 0,
                "use_dora": False,
                "use_rslora": False,
            }
        ],
        "adapter_order": "each adapter merged into the result of the ones before it",
        "dtype": "auto",
        "tensor_dtypes": ["float32"],
        "untied_lm_head": False,
        "tensors": {"tensors": 3},
        "shards": ["model.safetensors"],
        "max_shard_size": 5,
        "files": {},
        "check": {"passed": True},
        "verification": {"run": False},
        "warnings": [],
        "versions": {},
    }
    (tmp_path / "vlmtune.json").write_text(json.dumps(data))
    manifest = read_merged_manifest(tmp_path)
    assert isinstance(manifest, MergedManifest) and manifest.to_dict() == data
    assert list(manifest.to_dict()) == list(data), "key order as written"
    del data["adapters"][0]["sha256"]
    (tmp_path / "vlmtune.json").write_text(json.dumps(data))
    with pytest.raises(DamagedFileError, match=r"adapters\[0\]: missing \['sha256'\]"):
        read_merged_manifest(tmp_path)
