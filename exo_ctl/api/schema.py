"""Generate the JSON Schema of every kind into manifests/schema/ (``python -m exo_ctl.api.schema``).

Editors use these files to validate manifests as they are typed; a test fails when they are stale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic.json_schema import models_json_schema

from exo_ctl.api.resources import KINDS

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "manifests" / "schema"


def kind_schemas() -> dict[str, dict]:
    """Every kind and its parts as named JSON Schemas (refs ``#/$defs/NAME``): the one source of
    manifests/schema/ and of the API's OpenAPI documents."""
    _, defs = models_json_schema([(info.model, "validation") for info in KINDS.values()])
    return dict(defs.get("$defs", {}))


def schema_documents() -> dict[str, str]:
    """File name → JSON text for every kind."""
    out = {}
    for info in KINDS.values():
        schema = info.model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://exo.dev/schemas/v1alpha1/{info.singular}.json"
        out[f"{info.singular}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR)
    parser.add_argument("--check", action="store_true", help="exit 1 if the files on disk are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in schema_documents().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    if stale:
        print("stale JSON Schema (run `uv run python -m exo_ctl.api.schema`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
