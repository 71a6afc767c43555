"""Where a ModelDeployment's ``spec.model.source`` lives on this node's disk."""
from __future__ import annotations

from pathlib import Path

from reconciler.models.catalog import hf_cache_snapshot

TOKENIZER_PATTERNS = ["*.json", "*.py", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
WEIGHT_PATTERNS = [*TOKENIZER_PATTERNS, "*.safetensors"]


class ModelFilesError(Exception):
    """The model's files cannot be found or fetched; the message names the source."""


def original_copy(source: str, *, revision: str | None = None, weights: bool = True) -> Path | None:
    """This node's own copy of ``source``, used in place and never downloaded: the local path
    itself (with its config.json), or the Hugging Face cache snapshot (holding safetensors files
    when ``weights``). None when this node has none."""
    if not source.startswith("hf://"):
        path = Path(source).expanduser()
        return path if (path / "config.json").is_file() else None
    cached = hf_cache_snapshot(source[len("hf://"):], revision=revision)
    if cached is not None and (not weights or any(cached.glob("*.safetensors"))):
        return cached
    return None


def local_model_path(source: str, *, revision: str | None = None, patterns: list[str] = WEIGHT_PATTERNS) -> Path:
    """A local directory for ``source``: the path itself, or the Hugging Face snapshot, downloaded
    with huggingface_hub where a hub is reachable. Blocking: call it off the event loop."""
    original = original_copy(source, revision=revision, weights=patterns is WEIGHT_PATTERNS)
    if original is not None:
        return original
    if not source.startswith("hf://"):
        raise ModelFilesError(f"model {source!r}: no config.json in {Path(source).expanduser()} on this node")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source[len("hf://"):], revision=revision, allow_patterns=patterns))
    except Exception as error:  # network, auth, missing repo: all end as a message on the Shard
        raise ModelFilesError(f"model {source!r}: cannot download from the Hugging Face hub: {error}") from None
