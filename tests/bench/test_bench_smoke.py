"""Every bench script runs at HEAD: ``python -m bench.<name> --smoke`` (a few tokens, a few
iterations, real processes) exits 0 and prints its Markdown table, so no benchmark can rot."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
TABLE = re.compile(r"^## .+\n\n\|.+\|\n\|(---\|)+\n(\|.+\|\n)+", re.MULTILINE)
SMOKE_TIMEOUT = 240


def test_every_bench_script_is_smoke_tested() -> None:
    assert {"chaos", "pipeline", "pipeline_hops", "control_plane", "replacement", "serving_limits", "peers",
            "tensor_parallel", "batching", "weights"} <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_bench_script_runs_in_smoke_mode_and_prints_its_table(script: str) -> None:
    try:
        result = subprocess.run([sys.executable, "-m", f"bench.{script}", "--smoke"], cwd=ROOT,
                                capture_output=True, text=True, timeout=SMOKE_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench.{script} --smoke ran over {SMOKE_TIMEOUT} s\n{exc.stdout}\n{exc.stderr}")
    output = f"--- stdout\n{result.stdout}\n--- stderr (last 6000 chars)\n{result.stderr[-6000:]}"
    assert result.returncode == 0, f"bench.{script} --smoke exited {result.returncode}\n{output}"
    assert TABLE.search(result.stdout), f"bench.{script} --smoke printed no table\n{output}"
