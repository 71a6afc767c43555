"""The node's model cache: part files mlx-lm loads unchanged, written atomically, listed as the
node's cached models, and evicted least recently used first (never a model a Shard needs)."""
from __future__ import annotations

import json

import pytest

from reconciler.models.metadata import read_safetensors_header
from reconciler.models.model_info import ModelInfoSpec, model_info_name, stage_tensors
from reconciler.weights.store import CacheError, ModelCache, format_parts, is_partial_copy, parse_parts
from tests.weights.conftest import tensor_bytes

NAME = model_info_name("hf://test-org/tiny", None)


def parts_of(info: ModelInfoSpec, *, start: int, end: int, first: bool, last: bool) -> dict:
    grouped: dict = {}
    for tensor, part in stage_tensors(info, start=start, end=end, first=first, last=last).items():
        grouped.setdefault(part, []).append(tensor)
    return grouped


def write_stage(cache: ModelCache, directory, info, **stage) -> None:
    for part, tensors in parts_of(info, **stage).items():
        cache.write_part(info, part, {t: tensor_bytes(directory, info, t) for t in tensors})
    cache.write_side_file(info, "config.json", (directory / "config.json").read_bytes())


def test_a_complete_part_set_loads_in_mlx_lm_with_the_original_tensors(tmp_path, tiny_dir, tiny_info):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    cache = ModelCache(tmp_path / "cache")
    write_stage(cache, tiny_dir, tiny_info, start=0, end=8, first=True, last=True)
    loaded, _ = load_model(cache.directory(NAME), lazy=True, strict=False)
    original, _ = load_model(tiny_dir, lazy=True)
    ours, theirs = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(original.parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and mx.array_equal(ours[name], value), name


def test_a_partial_part_set_loads_non_strictly_with_the_stage_tensors_exact(tmp_path, tiny_dir, tiny_info):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    cache = ModelCache(tmp_path / "cache")
    write_stage(cache, tiny_dir, tiny_info, start=0, end=3, first=True, last=False)
    loaded, _ = load_model(cache.directory(NAME), lazy=True, strict=False)
    original, _ = load_model(tiny_dir, lazy=True)
    ours, theirs = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(original.parameters()))
    for name in stage_tensors(tiny_info, start=0, end=3, first=True, last=False):
        assert mx.array_equal(ours[name], theirs[name]), name
    assert not mx.array_equal(ours["model.layers.5.mlp.up_proj.weight"], theirs["model.layers.5.mlp.up_proj.weight"])


def test_a_part_file_keeps_original_names_dtypes_shapes_and_bytes(tmp_path, tiny_dir, tiny_info):
    cache = ModelCache(tmp_path / "cache")
    write_stage(cache, tiny_dir, tiny_info, start=2, end=3, first=False, last=False)
    file = cache.directory(NAME) / "model-layer-00002.safetensors"
    header = read_safetensors_header(file)
    entries = tiny_info.weightFiles[0].tensors
    expected = {t for t in entries if t.startswith("model.layers.2.")}
    assert set(header) == expected
    raw = file.read_bytes()
    base = 8 + int.from_bytes(raw[:8], "little")
    assert base % 8 == 0
    for tensor in expected:
        assert header[tensor]["dtype"] == entries[tensor].dtype and header[tensor]["shape"] == entries[tensor].shape
        begin, end = header[tensor]["data_offsets"]
        assert raw[base + begin:base + end] == tensor_bytes(tiny_dir, tiny_info, tensor)
    assert sorted(p.name for p in cache.directory(NAME).iterdir()) == [
        "config.json", "exo-cache.json", "model-layer-00002.safetensors"]


def test_parts_held_lists_only_parts_whose_file_was_written_whole(tmp_path, tiny_dir, tiny_info):
    cache = ModelCache(tmp_path / "cache")
    assert cache.parts_held(tiny_info) == set()
    write_stage(cache, tiny_dir, tiny_info, start=0, end=2, first=True, last=False)
    assert cache.parts_held(tiny_info) == {0, 1, "embedding"}
    tensor = "model.layers.3.mlp.up_proj.weight"
    with pytest.raises(CacheError, match=r"part 3: 'model\.layers\.3\.mlp\.up_proj\.weight' has 5 bytes"):
        cache.write_part(tiny_info, 3, {tensor: b"short"})
    assert cache.parts_held(tiny_info) == {0, 1, "embedding"}
    assert not (cache.directory(NAME) / "model-layer-00003.safetensors").exists()
    assert not [p for p in cache.directory(NAME).iterdir() if p.name.startswith(".")]  # no temporary left
    (cache.directory(NAME) / "model-layer-00001.safetensors").unlink()  # removed behind its back
    assert cache.parts_held(tiny_info) == {0, "embedding"}


def test_read_tensor_answers_ranges_it_holds_and_none_for_others(tmp_path, tiny_dir, tiny_info):
    cache = ModelCache(tmp_path / "cache")
    write_stage(cache, tiny_dir, tiny_info, start=0, end=1, first=False, last=False)
    tensor = "model.layers.0.mlp.down_proj.weight"
    whole = tensor_bytes(tiny_dir, tiny_info, tensor)
    assert cache.read_tensor(NAME, tensor, offset=100, length=50) == whole[100:150]
    assert cache.read_tensor(NAME, "model.layers.1.mlp.down_proj.weight", offset=0, length=4) is None
    assert cache.read_tensor("other-model", tensor, offset=0, length=4) is None
    with pytest.raises(CacheError, match="outside it"):
        cache.read_tensor(NAME, tensor, offset=len(whole) - 2, length=4)


def test_cached_lists_partial_copies_with_bytes_parts_and_last_use(tmp_path, tiny_dir, tiny_info):
    now = [1_700_000_000.0]
    cache = ModelCache(tmp_path / "cache", clock=lambda: now[0])
    write_stage(cache, tiny_dir, tiny_info, start=4, end=8, first=False, last=True)
    now[0] += 60
    cache.touch(NAME)
    [model] = cache.cached()
    on_disk = sum(p.stat().st_size for p in cache.directory(NAME).iterdir())
    assert model == {"name": NAME, "source": "hf://test-org/tiny", "revision": None, "bytes": on_disk,
                     "complete": False, "parts": ["4-7", "lm_head", "head"], "lastUsed": "2023-11-14T22:14:20Z"}
    assert is_partial_copy(cache.directory(NAME)) and not is_partial_copy(tiny_dir)
    manifest = json.loads((cache.directory(NAME) / "exo-cache.json").read_text())
    assert manifest["source"] == "hf://test-org/tiny" and manifest["parts"] == ["4-7", "lm_head", "head"]


def test_evict_removes_least_recently_used_models_until_within_the_limit_but_never_a_needed_one(
        tmp_path, tiny_dir, tiny_info):
    now = [1_700_000_000.0]
    infos = [tiny_info.model_copy(update={"source": f"hf://test-org/tiny-{i}"}) for i in range(4)]
    cache = ModelCache(tmp_path / "cache", clock=lambda: now[0])
    for info in infos:
        now[0] += 10
        write_stage(cache, tiny_dir, info, start=0, end=1, first=False, last=False)
    names = [model_info_name(i.source, None) for i in infos]
    size = cache.bytes_of(names[0])
    now[0] += 10
    cache.touch(names[0])  # now the most recently used
    cache.limit_bytes = 2 * size
    assert cache.evict(needed={names[1]}) == [names[2]] + [names[3]]
    assert sorted(m["name"] for m in cache.cached()) == sorted([names[0], names[1]])
    assert cache.evict(needed=set()) == []  # within the limit already
    cache.limit_bytes = 0
    assert cache.evict(needed={names[0], names[1]}) == []


def test_no_limit_evicts_nothing(tmp_path, tiny_dir, tiny_info):
    cache = ModelCache(tmp_path / "cache")
    write_stage(cache, tiny_dir, tiny_info, start=0, end=1, first=False, last=False)
    assert cache.evict(needed=set()) == [] and len(cache.cached()) == 1


@pytest.mark.parametrize(("parts", "listed"), [
    ({0, 1, 2, 5, 7, 8, "head", "embedding"}, ["0-2", "5", "7-8", "embedding", "head"]),
    ({"lm_head"}, ["lm_head"]),
    (set(), []),
])
def test_parts_are_listed_as_inclusive_layer_ranges_and_read_back(parts, listed):
    assert format_parts(parts) == listed
    assert parse_parts(listed) == parts


def test_side_file_names_that_leave_the_directory_are_refused(tmp_path, tiny_info):
    cache = ModelCache(tmp_path / "cache")
    for bad in ("../evil.json", ".hidden", "exo-cache.json", "model.safetensors.index.json", ""):
        with pytest.raises(CacheError, match="not a plain file name"):
            cache.write_side_file(tiny_info, bad, b"{}")
