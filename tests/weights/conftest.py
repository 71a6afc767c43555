"""The tiny model on disk and its ModelInfo (with every tensor's sha256), shared by the weights tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reconciler.models.model_info import ModelInfoSpec, info_from_directory

SOURCE = "hf://test-org/tiny"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


@pytest.fixture(scope="session")
def tiny_info(tiny_dir: Path) -> ModelInfoSpec:
    return info_from_directory(tiny_dir, source=SOURCE, revision=None, origin="node/a")


@pytest.fixture
def no_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty Hugging Face cache: the hf:// test model is not on this machine."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def tensor_bytes(directory: Path, info: ModelInfoSpec, tensor: str) -> bytes:
    """A tensor's bytes read straight from the original file."""
    for file in info.weightFiles:
        if tensor in file.tensors:
            with open(directory / file.name, "rb") as handle:
                handle.seek(file.offset(tensor))
                return handle.read(file.tensors[tensor].size)
    raise KeyError(tensor)


def corrupted_copy(directory: Path, info: ModelInfoSpec, target: Path, tensors: list[str]) -> Path:
    """A copy of the model with one byte flipped in the middle of each of ``tensors``."""
    shutil.copytree(directory, target)
    for file in info.weightFiles:
        with open(target / file.name, "r+b") as handle:
            for tensor in tensors:
                if tensor in file.tensors:
                    at = file.offset(tensor) + file.tensors[tensor].size // 2
                    handle.seek(at)
                    byte = handle.read(1)
                    handle.seek(at)
                    handle.write(bytes([byte[0] ^ 0xFF]))
    return target
