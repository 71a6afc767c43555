"""The JSON Schema files shipped in manifests/schema/ match the API types, and the reference
manifests validate."""
from pathlib import Path

import yaml

from exo_ctl.api.schema import SCHEMA_DIR, schema_documents
from exo_ctl.api.validation import normalize

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def test_generated_json_schema_files_are_up_to_date():
    for name, text in schema_documents().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{path} missing: run `uv run python -m exo_ctl.api.schema`"
        assert path.read_text() == text, f"{path} is stale: run `uv run python -m exo_ctl.api.schema`"


def test_reference_manifests_are_valid_model_deployments():
    files = sorted(MANIFESTS.glob("*.yaml"))
    assert files, "no reference manifests"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            obj = normalize(doc)
            assert obj["kind"] == "ModelDeployment", path
