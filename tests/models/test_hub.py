"""A model's ModelInfo and bytes read off a Hugging Face hub: the real huggingface_hub client
against FakeHub, a loopback server in the hub's HTTP layout serving models built here."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from exo_ctl.model_builder.build_model import build_model
from reconciler.models import hub as hub_module
from reconciler.models.catalog import ModelNotFound
from reconciler.models.hub import (
    HubError,
    HubReader,
    HubUnreachable,
    ModelAccessDenied,
    hub_model_info,
    hub_usable,
)
from reconciler.models.metadata import profile_from_directory, safetensors_files
from reconciler.models.model_info import file_sha256, info_from_directory, profile_from_info, side_files
from tests.fake_hub import FakeHub, isolate_hub_env

REPO, SHARDED, PRIVATE = "exo-test/tiny", "exo-test/tiny-sharded", "exo-test/tiny-private"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import mlx.core as mx

    tiny = build_model("tiny")
    sharded = shutil.copytree(tiny, tmp_path_factory.mktemp("hub") / "sharded")
    weights = mx.load(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        mx.save_safetensors(str(sharded / file), {name: weights[name] for name in part}, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": {name: file for file, part in halves.items() for name in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    return {REPO: tiny, SHARDED: sharded, PRIVATE: tiny}


@pytest.fixture
def hub(models, monkeypatch, tmp_path):
    with FakeHub(models, private={PRIVATE}, token="hf_secret") as fake:
        isolate_hub_env(monkeypatch, home=tmp_path / "hf", endpoint=fake.endpoint)
        yield fake


@pytest.mark.parametrize("repo", [REPO, SHARDED])
def test_a_model_read_off_the_hub_plans_exactly_like_the_same_files_on_disk(hub, models, repo):
    info = hub_model_info(repo)
    assert profile_from_info(info) == profile_from_directory(models[repo], name=repo)
    local = info_from_directory(models[repo], source=f"hf://{repo}", revision=None, origin="node/n0", digests=False)
    assert [(f.name, f.size, f.headerLength, f.tensors) for f in info.weightFiles] == \
           [(f.name, f.size, f.headerLength, f.tensors) for f in local.weightFiles]
    assert info.config == local.config
    assert [(f.name, f.size) for f in info.sideFiles] == [(f.name, f.size) for f in local.sideFiles]
    assert (info.source, info.origin, info.revision, info.commit) == (f"hf://{repo}", "hub", None, hub.commit(repo))


def test_weight_files_carry_the_hubs_sha256_and_config_its_own(hub, models):
    info = hub_model_info(SHARDED)
    on_disk = {f.name: f for f in safetensors_files(models[SHARDED])}
    assert {f.name: f.sha256 for f in info.weightFiles} == {name: file_sha256(f) for name, f in on_disk.items()}
    side = {f.name: f.sha256 for f in info.sideFiles}
    assert side["config.json"] == file_sha256(models[SHARDED] / "config.json")
    assert "model.safetensors.index.json" not in side
    assert set(side) == {f.name for f in side_files(models[SHARDED])}


def test_reading_model_info_fetches_only_config_index_and_headers(hub, models):
    info = hub_model_info(SHARDED)
    weights = {f.name: f for f in info.weightFiles}
    served = dict(hub.served_bytes)
    assert set(served) == {(SHARDED, "config.json"), (SHARDED, "model.safetensors.index.json"),
                           *((SHARDED, name) for name in weights)}
    for name, file in weights.items():
        assert 8 + file.headerLength <= served[(SHARDED, name)] < file.size / 100


def test_a_header_longer_than_the_first_read_takes_a_second_read_of_just_the_rest(hub, models, monkeypatch):
    monkeypatch.setattr(hub_module, "HEADER_PROBE_BYTES", 16)
    info = hub_model_info(REPO)
    assert profile_from_info(info) == profile_from_directory(models[REPO], name=REPO)
    assert hub.served_bytes[(REPO, "model.safetensors")] == 8 + info.weightFiles[0].headerLength


def test_a_model_pinned_to_its_commit_reads_the_same_and_keeps_the_revision_asked_for(hub):
    commit = hub.commit(REPO)
    info = hub_model_info(REPO, revision=commit)
    assert (info.revision, info.commit) == (commit, commit)
    assert profile_from_info(info) == profile_from_info(hub_model_info(REPO))


def test_a_range_read_gives_exactly_the_tensors_bytes_and_sends_no_more(hub, models):
    file = hub_model_info(REPO).weightFiles[0]
    tensor = "model.layers.3.mlp.down_proj.weight"
    start, length = file.offset(tensor), file.tensors[tensor].size
    before = hub.served_bytes[(REPO, file.name)]
    data = HubReader().read_range(REPO, revision=hub.commit(REPO), file=file.name, start=start, length=length)
    with open(models[REPO] / file.name, "rb") as handle:
        handle.seek(start)
        assert data == handle.read(length)
    assert hub.served_bytes[(REPO, file.name)] - before == length


def test_a_small_file_is_read_whole(hub, models):
    data = HubReader().read_file(REPO, revision=None, file="tokenizer.json")
    assert data == (models[REPO] / "tokenizer.json").read_bytes()


def test_a_range_past_the_end_of_the_file_is_a_short_read_not_silently_fewer_bytes(hub, models):
    size = (models[REPO] / "model.safetensors").stat().st_size
    with pytest.raises(HubError, match="short read: asked for 100 bytes at offset") as raised:
        HubReader().read_range(REPO, revision=None, file="model.safetensors", start=size - 10, length=100)
    assert REPO in str(raised.value) and hub.endpoint in str(raised.value)


def test_an_unknown_repository_is_model_not_found_naming_it_and_the_hub(hub):
    with pytest.raises(ModelNotFound) as raised:
        hub_model_info("exo-test/no-such-model")
    expected = f"model 'hf://exo-test/no-such-model': not found on the Hugging Face hub at {hub.endpoint}"
    assert str(raised.value) == expected
    assert raised.value.reason == "ModelNotFound"


def test_an_unknown_revision_or_file_is_model_not_found_naming_it(hub):
    with pytest.raises(ModelNotFound, match="revision 'v9' not found"):
        hub_model_info(REPO, revision="v9")
    with pytest.raises(ModelNotFound, match="model-00009.safetensors: not found on the Hugging Face hub"):
        HubReader().read_range(REPO, revision=None, file="model-00009.safetensors", start=0, length=8)


def test_a_private_repository_without_a_token_is_access_denied_naming_hf_token(hub):
    with pytest.raises(ModelAccessDenied) as raised:
        hub_model_info(PRIVATE)
    message = str(raised.value)
    assert raised.value.reason == "ModelAccessDenied"
    assert "private or gated" in message and "set HF_TOKEN on the node" in message and "no token was sent" in message
    assert f"hf://{PRIVATE}" in message and hub.endpoint in message
    with pytest.raises(ModelAccessDenied, match="set HF_TOKEN on the node"):
        HubReader().read_range(PRIVATE, revision=None, file="model.safetensors", start=0, length=8)


def test_a_private_repository_with_a_wrong_token_says_a_token_was_sent(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ModelAccessDenied, match="a token was sent"):
        hub_model_info(PRIVATE)


def test_a_private_repository_with_the_token_reads_like_a_public_one(hub, models, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert profile_from_info(hub_model_info(PRIVATE)) == profile_from_directory(models[PRIVATE], name=PRIVATE)
    assert HubReader().read_range(PRIVATE, revision=None, file="model.safetensors", start=0, length=8) == \
           (models[PRIVATE] / "model.safetensors").read_bytes()[:8]
    cdn = [request for request in hub.requests if request.path.startswith("/cdn/")]
    assert cdn and not any(request.authorized for request in cdn), "the token must not follow the redirect to the CDN"


def test_an_unreachable_hub_is_reported_naming_its_endpoint(monkeypatch, tmp_path):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    isolate_hub_env(monkeypatch, home=tmp_path / "hf", endpoint=endpoint)
    with pytest.raises(HubUnreachable, match=f"cannot reach the Hugging Face hub at {endpoint}") as raised:
        hub_model_info(REPO)
    assert raised.value.reason == "HubUnreachable"
    with pytest.raises(HubUnreachable, match=endpoint):
        HubReader().read_range(REPO, revision=None, file="model.safetensors", start=0, length=8)


def test_offline_mode_makes_the_hub_unusable_and_sends_nothing(hub, monkeypatch):
    assert hub_usable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_usable()
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE"):
        hub_model_info(REPO)
    assert hub.requests == []


def test_the_fake_hub_serves_huggingface_hubs_own_download_and_safetensors_calls(hub, models, tmp_path):
    api = HfApi(endpoint=hub.endpoint)
    metadata = api.get_safetensors_metadata(SHARDED)
    assert sorted(metadata.files_metadata) == [f.name for f in safetensors_files(models[SHARDED])]
    assert api.file_exists(REPO, "tokenizer.json") and not api.file_exists(REPO, "nope.json")
    path = hf_hub_download(REPO, "tokenizer.json", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == (models[REPO] / "tokenizer.json").read_bytes()
    weights = "model-00001-of-00002.safetensors"  # an LFS file: through the redirect to the "CDN"
    path = hf_hub_download(SHARDED, weights, endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert file_sha256(Path(path)) == file_sha256(models[SHARDED] / weights)


def test_a_node_process_given_hf_endpoint_reads_the_fake_hub(hub):
    code = "from reconciler.models.hub import hub_model_info; print(hub_model_info('exo-test/tiny').commit)"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hub.commit(REPO)
