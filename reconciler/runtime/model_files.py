"""Where a ModelDeployment's ``spec.model.source`` lives on this node's disk."""
from __future__ import annotations

from pathlib import Path

from reconciler.models.catalog import hf_cache_snapshot

TOKENIZER_PATTERNS = ["*.json", "*.py", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
WEIGHT_PATTERNS = [*TOKENIZER_PATTERNS, "*.safetensors"]


class ModelFilesError(Exception):
    """The model's files cannot be found or fetched; the message names the source."""


def local_model_path(source: str, *, revision: str | None = None, patterns: list[str] = WEIGHT_PATTERNS) -> Path:
    """A local directory for ``source``: the path itself, or the Hugging Face snapshot, downloaded
    with huggingface_hub where a hub is reachable. Blocking: call it off the event loop."""
    if not source.startswith("hf://"):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise ModelFilesError(f"model {source!r}: no config.json in {path} on this node")
        return path
    repo = source[len("hf://"):]
    cached = hf_cache_snapshot(repo, revision=revision)
    if cached is not None and (patterns is not WEIGHT_PATTERNS or any(cached.glob("*.safetensors"))):
        return cached
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns))
    except Exception as error:  # network, auth, missing repo: all end as a message on the Shard
        raise ModelFilesError(f"model {source!r}: cannot download from the Hugging Face hub: {error}") from None
