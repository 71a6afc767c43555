"""The tiny test model with a tool-calling chat template (Hermes style: ``<tool_call>`` JSON,
which mlx-lm's ``json_tools`` parser reads). The weights and tokenizer are the tiny model's.

    python -m exo_ctl.model_builder.tools_model [--out DIR]
"""
from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import tempfile
from pathlib import Path

from exo_ctl.model_builder.build_model import build_model, default_cache_dir

TOOLS_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "You may call these functions:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "To call one, write <tool_call>\n{\"name\": <name>, \"arguments\": <arguments>}\n</tool_call><|eot_id|>"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ message.content or '' }}"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
    "<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}\n"
    "</tool_call>{%- endfor %}<|eot_id|>"
    "{%- elif message.role == 'tool' %}"
    "<|start_header_id|>tool<|end_header_id|>\n\n<tool_response>\n{{ message.content }}\n</tool_response><|eot_id|>"
    "{%- else %}"
    "<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content | trim }}<|eot_id|>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tools_model(*, cache_dir: Path | None = None) -> Path:
    """The directory of the tiny model with ``TOOLS_CHAT_TEMPLATE``, written beside it."""
    tiny = build_model("tiny", cache_dir=cache_dir)
    path = Path(cache_dir or default_cache_dir()).resolve() / "tiny-tools"
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = json.loads((tiny / "exoctl-model.json").read_text()) | {"chat_template": TOOLS_CHAT_TEMPLATE}
        if path.exists() and json.loads((path / "exoctl-model.json").read_text()) == stamp:
            return path
        staging = Path(tempfile.mkdtemp(prefix=".tiny-tools-", dir=path.parent))
        try:
            shutil.copytree(tiny, staging, dirs_exist_ok=True)
            config = json.loads((staging / "tokenizer_config.json").read_text())
            config["chat_template"] = TOOLS_CHAT_TEMPLATE
            (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (staging / "exoctl-model.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            staging.chmod(0o755)
            if path.exists():
                shutil.rmtree(path)
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    print(build_tools_model(cache_dir=parser.parse_args(argv).cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
