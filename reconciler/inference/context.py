"""A model's context length, read from its ``config.json`` (the families name it differently)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Most families say max_position_embeddings; GPT-2 style n_positions / n_ctx; a few others
# max_sequence_length or seq_length. Multimodal configs keep it under text_config.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(config: Mapping[str, Any]) -> int | None:
    """The longest sequence (prompt + completion, in tokens) the model was built for, or None."""
    for section in (config.get("text_config"), config):
        if not isinstance(section, Mapping):
            continue
        for field in CONTEXT_FIELDS:
            value = section.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def read_context_length(model_dir: Path) -> int | None:
    """``context_length`` of ``model_dir/config.json``; None when it is missing or unreadable."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return context_length(config) if isinstance(config, Mapping) else None
