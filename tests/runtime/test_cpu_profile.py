"""The start-up choice of compute dtype and BLAS: pure decisions over measurements and the host."""
from __future__ import annotations

import asyncio
import itertools
import json
import math

import pytest

from exo_ctl.api.resources import TensorGroup
from reconciler.models.memory import compute_scale
from reconciler.runtime.blas import REEXEC_MARK, BlasError, preload_environment
from reconciler.runtime.cpu_profile import (choose_dtype, compute_profile, loaded_blas, tensor_loader_in,
                                            time_matmuls)
from reconciler.runtime.weight_dtype import serving_dtype

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


@pytest.mark.parametrize(("timings", "chosen"), [
    ({"bfloat16": 0.010, "float32": 0.004}, "float32"),   # OpenBLAS: fp32 2.5x faster
    ({"bfloat16": 0.005, "float32": 0.050}, "bfloat16"),  # reference BLAS: bf16 wins
    ({"bfloat16": 0.010, "float32": 0.0095}, "bfloat16"),  # 5% faster does not pay for 2x memory
    ({"bfloat16": 0.010, "float32": 0.010}, "bfloat16"),
    ({"float32": 0.010}, "float32"),
])
def test_another_dtype_replaces_bf16_only_when_clearly_faster(timings, chosen):
    assert choose_dtype(timings) == chosen


def test_choosing_among_no_measurements_is_an_error():
    with pytest.raises(ValueError, match="no timings"):
        choose_dtype({})


def test_the_measurement_stops_after_one_round_once_its_budget_is_spent():
    ticks = itertools.count(step=100.0)  # every reading 100 s later: the budget is gone at once
    timings = time_matmuls(clock=lambda: next(ticks), budget_s=1.0)
    assert set(timings) == {"bfloat16", "float32"}
    assert all(math.isfinite(seconds) and seconds == 100.0 for seconds in timings.values())


@pytest.mark.parametrize(("maps", "blas"), [
    ("7f 00:00 1 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0\n"
     "7f 00:00 2 /venv/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0\n", "openblas"),
    ("7f 00:00 2 /venv/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0\n", "reference"),
    ("7f 00:00 0 [heap]\n7f 00:00 3 /lib/libc.so.6\n", ""),
])
def test_the_blas_in_the_process_is_named_from_its_memory_map(maps, blas):
    assert loaded_blas(maps) == blas


def test_this_process_reports_the_blas_mlx_bundles_or_the_preloaded_one():
    assert loaded_blas() in ("openblas", "reference")


def test_a_flag_dtype_is_used_without_measuring_and_files_keeps_the_stored_dtype():
    assert compute_profile("float32").model_dump(include={"dtype", "source", "matmulMs"}) == {
        "dtype": "float32", "source": "flag", "matmulMs": {}}
    assert compute_profile("files").dtype == ""
    with pytest.raises(ValueError, match="--compute-dtype: must be one of"):
        compute_profile("bfloat16")


@pytest.mark.parametrize(("choice", "environ", "system", "library", "preload"), [
    ("auto", {}, "Linux", OPENBLAS, OPENBLAS),
    ("openblas", {"LD_PRELOAD": "/lib/libjemalloc.so"}, "Linux", OPENBLAS, f"{OPENBLAS} /lib/libjemalloc.so"),
    ("auto", {}, "Linux", None, None),               # not installed: run with the bundled BLAS
    ("auto", {}, "Darwin", OPENBLAS, None),          # Apple silicon: Accelerate and Metal
    ("bundled", {}, "Linux", OPENBLAS, None),
    ("auto", {REEXEC_MARK: "1"}, "Linux", OPENBLAS, None),  # already restarted once: never loop
    ("auto", {"LD_PRELOAD": OPENBLAS}, "Linux", OPENBLAS, None),
])
def test_the_node_restarts_with_openblas_preloaded_only_where_it_helps_and_once(choice, environ, system, library,
                                                                                 preload):
    environment = preload_environment(choice, environ=environ, system=system, library=library)
    if preload is None:
        assert environment is None
    else:
        assert environment["LD_PRELOAD"] == preload
        assert environment[REEXEC_MARK] == "1" and environment["OPENBLAS_NUM_THREADS"] == "1"


def test_asking_for_openblas_where_it_is_missing_says_how_to_install_it():
    with pytest.raises(BlasError, match="--blas openblas: .*apt install libopenblas0-pthread"):
        preload_environment("openblas", environ={}, system="Linux", library=None)


def test_an_explicit_blas_thread_count_is_kept():
    environment = preload_environment("auto", environ={"OPENBLAS_NUM_THREADS": "2"}, system="Linux", library=OPENBLAS)
    assert environment["OPENBLAS_NUM_THREADS"] == "2"


QUANTIZED = {"quantization": {"bits": 4, "group_size": 64}}


@pytest.mark.parametrize(("requested", "compute", "config", "served"), [
    (None, "float32", {}, "float32"),             # float files in the node's dtype
    ("bfloat16", "float32", {}, "bfloat16"),      # spec.model.dtype wins
    (None, "", {}, None),                          # the node keeps the files' dtype
    (None, "bfloat16", {}, None),                  # bf16 fastest: float32 files are never narrowed
    (None, "float32", QUANTIZED, None),            # quantized files stay as they are
    ("4bit", "float32", QUANTIZED, "4bit"),
])
def test_a_stage_loads_in_the_users_dtype_else_widens_float_files_to_the_nodes_float32(requested, compute, config, served):
    assert serving_dtype(requested, compute_dtype=compute, config=config) == served


@pytest.mark.parametrize(("planned", "node", "requested", "scale"), [
    ("bfloat16", "float32", None, 2.0),
    ("float32", "float32", None, 1.0),
    ("float32", "bfloat16", None, 1.0),            # never narrowed
    ("bfloat16", "float32", "bfloat16", 1.0),
    ("4bit", "float32", None, 1.0),
    ("bfloat16", "", None, 1.0),
])
def test_the_memory_plan_counts_the_bytes_of_the_dtype_a_node_loads_in(planned, node, requested, scale):
    assert compute_scale(planned, node_dtype=node, requested=requested) == scale


@pytest.mark.parametrize(("group_dtype", "loaded"), [
    ("float32", "float32"),  # the scheduler found the whole group computes fastest in float32
    (None, None),  # mixed nodes: every rank keeps the files' dtype
])
def test_tensor_ranks_load_in_the_dtype_the_scheduler_wrote_for_their_group(tmp_path, group_dtype, loaded):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    group = TensorGroup(rank=0, size=2, computeDtype=group_dtype,
                        peers=[{"node": "a", "address": "127.0.0.1:1"}, {"node": "b", "address": "127.0.0.1:2"}])
    seen = []

    async def loader(path, *, dtype, group, start):
        seen.append(dtype)

    load = tensor_loader_in(loader)
    asyncio.run(load(tmp_path, dtype=None, group=group, start=0))
    asyncio.run(load(tmp_path, dtype="bfloat16", group=group, start=0))  # spec.model.dtype always wins
    assert seen == [loaded, "bfloat16"]
