"""Manifest text shared by the exoctl tests."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def deployment_yaml(name: str = "llama", *, source: str = "hf://org/model", replicas: int = 1,
                    labels: dict[str, str] | None = None, namespace: str | None = None) -> str:
    lines = ["apiVersion: exo.dev/v1alpha1", "kind: ModelDeployment", "metadata:", f"  name: {name}"]
    if namespace:
        lines.append(f"  namespace: {namespace}")
    if labels:
        lines.append("  labels:")
        lines += [f"    {k}: {v}" for k, v in labels.items()]
    lines += ["spec:", "  model:", f"    source: {source}", f"  replicas: {replicas}"]
    return "\n".join(lines) + "\n"


EXOCTL = shutil.which("exoctl", path=str(Path(sys.executable).parent))
COMMAND = [EXOCTL] if EXOCTL else [sys.executable, "-m", "exo_ctl.cli.main"]
TOKEN = "cli-test-token"
