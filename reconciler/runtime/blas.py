"""``exo --blas``: which BLAS library MLX's float32 matmuls call on a Linux CPU node.

MLX's Linux wheel links a bundled reference BLAS. OpenBLAS exports the same symbols, so preloading
it (LD_PRELOAD, which only takes effect when a process starts) makes MLX call it instead: measured
here, a batch-8 float32 matmul drops from 94 to 18 ms. ``auto`` and ``openblas`` re-execute the node
once with the library preloaded and one BLAS thread (MLX uses one core per process).
"""
from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

CHOICES = ("auto", "openblas", "bundled")
# Debian/Ubuntu's libopenblas0-pthread (and -openmp / -serial), then what the linker finds.
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
REEXEC_MARK = "EXO_BLAS_PRELOADED"  # set in the re-executed process: never loop


class BlasError(ValueError):
    """--blas asks for a library this host does not have."""


def find_openblas(paths: tuple[str, ...] = OPENBLAS_PATHS) -> str | None:
    for path in paths:
        if Path(path).exists():
            return path
    found = ctypes.util.find_library("openblas")
    return found if found and Path(found).is_absolute() else None


def preload_environment(choice: str, *, environ: Mapping[str, str], system: str,
                        library: str | None) -> dict[str, str] | None:
    """The environment to re-execute with so ``library`` takes MLX's BLAS calls, or None to run as
    is (bundled, not Linux, already preloaded, or nothing found for auto)."""
    if choice not in CHOICES:
        raise BlasError(f"--blas: must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "bundled" or environ.get(REEXEC_MARK) or system != "Linux":
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if "openblas" in preloaded:
        return None
    if library is None:
        if choice == "openblas":
            raise BlasError("--blas openblas: libopenblas.so.0 not found (Debian/Ubuntu: apt install libopenblas0-pthread)")
        return None
    return {**environ, "LD_PRELOAD": f"{library} {preloaded}".strip(), REEXEC_MARK: "1",
            "OPENBLAS_NUM_THREADS": environ.get("OPENBLAS_NUM_THREADS", "1")}


def reexec_with_blas(choice: str) -> None:
    """Replace this process (same pid) by itself with the BLAS preloaded, when ``choice`` asks.
    Called first thing in ``exo``: before any port is opened or thread started."""
    environment = preload_environment(choice, environ=os.environ, system=platform.system(), library=find_openblas())
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, [sys.executable, *argv[1:]], environment)
