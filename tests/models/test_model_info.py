"""A model's ModelInfo read from its directory: per-tensor digests of the real bytes, the tensors
each pipeline stage loads, the same profile as the directory's, and a stable store name."""
import hashlib
import json
import re

import pytest

from reconciler.models.metadata import profile_from_directory
from reconciler.models.model_info import (
    info_from_directory,
    model_info_name,
    model_info_object,
    profile_from_info,
    stage_tensors,
)
from tests.model_files import TWO_LAYER_LLAMA, write_model

FOUR_LAYERS_UNTIED = {**TWO_LAYER_LLAMA, "num_hidden_layers": 4}
FOUR_LAYERS_TIED = {**TWO_LAYER_LLAMA, "num_hidden_layers": 4, "tie_word_embeddings": True}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "untied", FOUR_LAYERS_UNTIED, tokenizer=True)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tied", FOUR_LAYERS_TIED)


def info(path, **kw):
    return info_from_directory(path, source=str(path), revision=None, origin="node/a", **kw)


def test_each_tensor_digest_is_the_sha256_of_its_bytes_in_the_file(untied):
    spec = info(untied)
    [file] = spec.weightFiles
    raw = (untied / file.name).read_bytes()
    assert file.size == len(raw) and file.headerLength == int.from_bytes(raw[:8], "little")
    assert len(file.tensors) > 10
    for name, tensor in file.tensors.items():
        offset = file.offset(name)
        assert tensor.sha256 == hashlib.sha256(raw[offset:offset + tensor.size]).hexdigest(), name


def test_side_files_carry_their_digests_and_headers_alone_carry_none(untied):
    side = {f.name: f for f in info(untied).sideFiles}
    assert {"config.json", "tokenizer.json"} <= side.keys()
    assert side["config.json"].sha256 == hashlib.sha256((untied / "config.json").read_bytes()).hexdigest()
    quick = info(untied, digests=False)
    assert all(t.sha256 is None for f in quick.weightFiles for t in f.tensors.values())
    assert [t.size for t in quick.weightFiles[0].tensors.values()] == [t.size for t in info(untied).weightFiles[0].tensors.values()]


def test_a_middle_stage_loads_only_its_layers(untied):
    parts = stage_tensors(info(untied, digests=False), start=1, end=3, first=False, last=False)
    assert set(parts.values()) == {1, 2}
    assert all(re.search(r"layers\.[12]\.", name) for name in parts)


def test_the_first_stage_adds_the_embedding_and_the_last_the_norm_and_lm_head(untied):
    spec = info(untied, digests=False)
    first = stage_tensors(spec, start=0, end=2, first=True, last=False)
    last = stage_tensors(spec, start=2, end=4, first=False, last=True)
    assert set(first.values()) == {0, 1, "embedding"} and "model.embed_tokens.weight" in first
    assert set(last.values()) == {2, 3, "head", "lm_head"}
    assert {"model.norm.weight", "lm_head.weight"} <= last.keys() and "model.embed_tokens.weight" not in last
    every = {name for f in spec.weightFiles for name in f.tensors}
    assert first.keys() | last.keys() == every and not first.keys() & last.keys()


def test_with_tied_embeddings_the_last_stage_loads_the_embedding_as_its_output_projection(tied):
    spec = info(tied, digests=False)
    last = stage_tensors(spec, start=2, end=4, first=False, last=True)
    assert "model.embed_tokens.weight" in last and "lm_head" not in last.values()
    whole = stage_tensors(spec, start=0, end=4, first=True, last=True)
    assert whole.keys() == {name for f in spec.weightFiles for name in f.tensors}


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_the_profile_from_the_info_equals_the_profile_of_the_directory(model, request):
    path = request.getfixturevalue(model)
    from_info = profile_from_info(info(path, digests=False))
    assert from_info.model_dump(exclude={"name"}) == profile_from_directory(path).model_dump(exclude={"name"})


def test_the_record_round_trips_through_its_store_object(untied):
    spec = info(untied)
    obj = json.loads(json.dumps(model_info_object(spec)))
    assert obj["kind"] == "ModelInfo" and obj["metadata"]["name"] == model_info_name(spec.source, None)
    assert type(spec).model_validate(obj["spec"]) == spec


def test_the_name_is_stable_dns_safe_and_distinct_per_source_and_revision():
    name = model_info_name("hf://Org/Some_Model.v2", None)
    assert name == model_info_name("hf://Org/Some_Model.v2", None)
    assert name.startswith("org-some-model-v2-") and DNS_SUBDOMAIN.match(name) and len(name) <= 63
    assert model_info_name("hf://Org/Some_Model.v2", "main") != name
    assert model_info_name("hf://org/some-model-v2", None) != name  # same slug, other source
    long = model_info_name("/models/" + "x" * 300 + "/__weird__", "refs/pr/1")
    assert DNS_SUBDOMAIN.match(long) and len(long) <= 63
    assert DNS_SUBDOMAIN.match(model_info_name("hf://---", None))
