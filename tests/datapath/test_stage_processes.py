"""The one data-path test with stages in separate OS processes (python -m reconciler.datapath)."""

import asyncio
import os
import signal
import subprocess
import sys
import time

from reconciler.datapath import PipelineClient, StageAddress, StageLost

PROMPT = [4, 8, 15, 16, 23, 42, 7, 7, 1]


def spawn_stage(model_path, *, start, end, shard):
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler.datapath", "--model", str(model_path),
         "--start", str(start), "--end", str(end), "--shard", shard, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_ready(process, shard):
    line = process.stdout.readline()  # "READY <port>" once the shard is loaded and listening
    assert line.startswith("READY "), f"stage process for {shard} printed {line!r}"
    return StageAddress(host="127.0.0.1", port=int(line.split()[1]), shard=shard)


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.stdout.close()


async def test_stages_in_separate_processes_decode_like_mlx_lm_and_a_killed_one_fails_fast(tiny_model, reference_tokens):
    expected = reference_tokens(tiny_model, PROMPT, max_tokens=16)
    # Three processes start in parallel: two stages and a spare for the last one.
    first = spawn_stage(tiny_model, start=0, end=3, shard="a")
    second = spawn_stage(tiny_model, start=3, end=6, shard="b")
    replacement = spawn_stage(tiny_model, start=3, end=6, shard="b")
    processes = [first, second, replacement]
    try:
        first_address, second_address, replacement_address = await asyncio.to_thread(
            lambda: [wait_ready(p, "a" if p is first else "b") for p in processes]
        )
        async with PipelineClient() as client:
            route = [first_address, second_address]
            tokens = [t async for t in client.generate(route, PROMPT, max_tokens=16)]
            assert tokens == expected

            stream = client.generate(route, PROMPT, max_tokens=100_000)
            await anext(stream)
            os.kill(second.pid, signal.SIGKILL)
            started = time.monotonic()
            try:
                async for _ in stream:
                    pass
                raise AssertionError("the stream went on after its last stage was killed")
            except StageLost:
                assert time.monotonic() - started < 5

            tokens = [t async for t in client.generate([first_address, replacement_address], PROMPT, max_tokens=16)]
            assert tokens == expected
    finally:
        for process in processes:
            stop(process)
