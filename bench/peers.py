"""Our cluster against llama.cpp on the same model (``build_model("small")``, bf16): decode tokens/s of
llama.cpp in one process and through its RPC backend over 2 ``ggml-rpc-server`` processes on loopback,
against our 1- and 2-node cluster, with the ratios; ours both with the CPU fast path (``exo``'s
defaults: dtype measured at start, OpenBLAS preloaded when installed) and with it off.

llama.cpp is built once from the ``llama-cpp-python`` source distribution (which vendors it), with
``-DGGML_RPC=ON``, under ``$EXOCTL_BENCH_CACHE`` (default ~/.cache/exoctl-bench); this takes minutes.
The model is written as GGUF with the vendored gguf-py (the vendored convert_hf_to_gguf.py needs
torch, which this project does not install). Where llama.cpp cannot be built the llama.cpp rows are
skipped with a message.

    uv run python -m bench.peers [--tokens 64] [--repeats 3]
    uv run python -m bench.peers --no-llama-cpp   # our side only
    uv run python -m bench.peers --smoke   # our side only, tiny model, a few tokens (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.pipeline import stream_completion
from bench.report import print_table
from exo_ctl.model_builder.build_model import build_model
from harness.cluster import free_port_block, start_cluster
from harness.serving import API, apply, wait_nodes_ready, wait_serving

PROMPT = "The history of distributed computing begins with"
CACHE = Path(os.environ.get("EXOCTL_BENCH_CACHE", Path.home() / ".cache" / "exoctl-bench"))
TARGETS = ("llama-bench", "ggml-rpc-server")  # the RPC server target of the vendored llama.cpp
FAST = ("--compute-dtype", "auto", "--blas", "auto")
STOCK = ("--compute-dtype", "files", "--blas", "bundled")


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp could not be fetched, built or run here; the message says which step failed."""


# --- llama.cpp: source, build, GGUF ---------------------------------------------------------------

def _run_step(what: str, command: list[str], *, cwd: Path | None = None, log: Path) -> None:
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise LlamaCppUnavailable(f"{what} failed (exit {done.returncode}, log {log}):\n{tail}")


def _pip() -> list[str]:
    """The environment's pip, else the one on PATH (a uv-made venv has none)."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    if found is None:
        raise LlamaCppUnavailable("no pip to download the llama-cpp-python sdist with (neither in this venv nor on PATH)")
    return [found]


def llama_cpp_source(cache: Path = CACHE) -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python sdist, downloaded once with pip."""
    sdists = cache / "sdist"
    found = sorted(sdists.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        sdists.mkdir(parents=True, exist_ok=True)
        _run_step("pip download llama-cpp-python", [*_pip(), "download", "--no-binary", ":all:",
                                                    "--no-deps", "llama-cpp-python", "-d", str(sdists)],
                  log=cache / "pip-download.log")
        found = sorted(sdists.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise LlamaCppUnavailable(f"no llama_cpp_python sdist in {sdists}")
    root = cache / found[-1].name.removesuffix(".tar.gz")
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(found[-1]) as archive:
            archive.extractall(cache, filter="data")
    return root / "vendor" / "llama.cpp"


def build_llama_cpp(source: Path, *, jobs: int = 2) -> Path:
    """``llama-bench`` and ``ggml-rpc-server`` built with the RPC backend (kept: later runs reuse them)."""
    build = source / "build"
    binaries = build / "bin"
    if all((binaries / target).exists() for target in TARGETS):
        return binaries
    _run_step("cmake configure", ["cmake", "-S", str(source), "-B", str(build), "-DGGML_RPC=ON",
                                  "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                                  "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
              log=source.parent / "cmake-config.log")
    _run_step("cmake build", ["nice", "-n", "19", "cmake", "--build", str(build), "-j", str(jobs),
                              "--target", *TARGETS], log=source.parent / "cmake-build.log")
    return binaries


def _permute(weights: Any, heads: int) -> Any:
    """Hugging Face's rotary layout to llama.cpp's (as convert_hf_to_gguf's LlamaModel.permute)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(model: Path, out: Path, *, gguf_py: Path) -> Path:
    """A llama-family model directory (config.json, safetensors, tokenizer.json) as a bf16 GGUF."""
    if out.exists():
        return out
    sys.path.insert(0, str(gguf_py))
    import gguf
    import mlx.core as mx
    import numpy as np
    from gguf.quants import quantize

    config = json.loads((model / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise LlamaCppUnavailable(f"{model}: bench.peers writes GGUF for llama models only, got {config.get('model_type')}")
    heads, kv_heads, layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out) + ".part", "llama")
    writer.add_name(model.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    _add_tokenizer(writer, model, vocab_size=config["vocab_size"], gguf=gguf)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for file in sorted(model.glob("*.safetensors")):
        for name, value in mx.load(str(file)).items():
            if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            data = np.array(value.astype(mx.float32))
            if name.endswith("q_proj.weight"):
                data = _permute(data, heads)
            elif name.endswith("k_proj.weight"):
                data = _permute(data, kv_heads)
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise LlamaCppUnavailable(f"{file}: no GGUF name for tensor {name!r}")
            if data.ndim == 1:  # norms stay float32, as llama.cpp's converter writes them
                writer.add_tensor(target, data)
            else:
                writer.add_tensor(target, quantize(data, gguf.GGMLQuantizationType.BF16),
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".part").rename(out)
    return out


def _add_tokenizer(writer: Any, model: Path, *, vocab_size: int, gguf: Any) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary, padded to the embedding rows."""
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    if tokenizer["model"]["type"] != "BPE":
        raise LlamaCppUnavailable(f"{model}/tokenizer.json: only BPE tokenizers are written, got {tokenizer['model']['type']}")
    by_id = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    special = {added["id"] for added in tokenizer.get("added_tokens", []) if added.get("special")}
    by_id.update({added["id"]: added["content"] for added in tokenizer.get("added_tokens", [])})
    tokens, types = [], []
    for index in range(vocab_size):
        tokens.append(by_id.get(index, f"[PAD{index}]"))
        types.append(gguf.TokenType.CONTROL if index in special else
                     gguf.TokenType.NORMAL if index in by_id else gguf.TokenType.UNUSED)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    gguf.SpecialVocab(model, load_merges=False).add_to_gguf(writer)


# --- llama.cpp: measuring ------------------------------------------------------------------------

@contextlib.contextmanager
def rpc_servers(binaries: Path, count: int, *, log_dir: Path) -> Iterator[list[str]]:
    """``count`` ggml-rpc-server processes on 127.0.0.1, one thread each; yields their HOST:PORT."""
    base = free_port_block(set(), size=count)
    ports = list(range(base, base + count))
    procs = []
    try:
        for port in ports:
            out = open(log_dir / f"rpc-{port}.log", "w")
            procs.append(subprocess.Popen([str(binaries / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                          stdout=out, stderr=subprocess.STDOUT))
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def llama_bench(binaries: Path, gguf_file: Path, *, tokens: int, repeats: int, rpc: list[str] | None = None) -> float:
    """llama.cpp's own decode tokens/s (``llama-bench -p 0 -n tokens``, one thread)."""
    command = [str(binaries / "llama-bench"), "-m", str(gguf_file), "-p", "0", "-n", str(tokens), "-t", "1",
               "-r", str(repeats), "-o", "json"]
    if rpc:
        command += ["--rpc", ",".join(rpc), "-ngl", "99"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise LlamaCppUnavailable(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-1500:]}")
    return float(json.loads(done.stdout)[0]["avg_ts"])


# --- our cluster ---------------------------------------------------------------------------------

def ours(model: Path, ids: list[int], *, nodes: int, tokens: int, repeats: int, flags: tuple[str, ...],
         root: Path) -> dict[str, Any]:
    """Best decode tokens/s through the OpenAI API of a fresh ``nodes``-node cluster (Spread)."""
    cluster = start_cluster(nodes, root / f"{nodes}-{flags[1]}", extra_args=flags)
    try:
        wait_nodes_ready(cluster, nodes)
        entry = cluster.nodes[0]
        apply(entry, "bench", model)
        wait_serving(entry, "bench", stages=nodes, timeout=180)
        _, _, listing = entry.request("GET", f"{API}/nodes")
        compute = sorted({f"{n['status']['compute']['dtype'] or 'files'}/{n['status']['compute']['blas']}"
                          for n in listing["items"]})
        stream_completion(entry, ids, 4)  # warm-up
        runs = [stream_completion(entry, ids, tokens) for _ in range(repeats)]
        return {"decode_tps": max(r["decode_tps"] for r in runs), "compute": ",".join(compute)}
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close()


def llama_cpp(model: Path, *, tokens: int, repeats: int, root: Path) -> dict[str, float]:
    source = llama_cpp_source()
    binaries = build_llama_cpp(source)
    gguf_file = write_gguf(model, CACHE / f"{model.name}-bf16.gguf", gguf_py=source / "gguf-py")
    single = llama_bench(binaries, gguf_file, tokens=tokens, repeats=repeats)
    with rpc_servers(binaries, 2, log_dir=root) as endpoints:
        rpc = llama_bench(binaries, gguf_file, tokens=tokens, repeats=repeats, rpc=endpoints)
    return {"single": single, "rpc": rpc}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="our side only (no llama.cpp build), tiny model")
    parser.add_argument("--no-llama-cpp", action="store_true", help="our side only, on the small model")
    args = parser.parse_args(argv)
    model = build_model("tiny" if args.smoke else "small")
    tokens, repeats = (4, 1) if args.smoke else (args.tokens, args.repeats)
    from mlx_lm.utils import load_tokenizer

    ids = list(load_tokenizer(model).encode(PROMPT))
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="exo-bench-peers-") as tmp:
        peers: dict[str, float] = {}
        if args.smoke or args.no_llama_cpp:
            print("bench.peers: llama.cpp not run (--smoke / --no-llama-cpp): our side only", file=sys.stderr)
        else:
            try:
                peers = llama_cpp(model, tokens=tokens, repeats=repeats, root=Path(tmp))
            except LlamaCppUnavailable as error:
                print(f"bench.peers: skipping llama.cpp: {error}", file=sys.stderr)
        if peers:
            rows += [["llama.cpp, 1 process (1 thread)", "bf16", f"{peers['single']:.2f}", "1.00"],
                     ["llama.cpp RPC, 2 rpc-servers", "bf16", f"{peers['rpc']:.2f}", "1.00"]]
        for label, flags in (("fast path", FAST),) if args.smoke else (("fast path", FAST), ("stock MLX", STOCK)):
            for nodes in (1, 2):
                result = ours(model, ids, nodes=nodes, tokens=tokens, repeats=repeats, flags=flags, root=Path(tmp))
                print(json.dumps({"nodes": nodes, "flags": flags, **result}), flush=True)
                against = peers.get("single" if nodes == 1 else "rpc")
                rows.append([f"exo, {nodes} node{'s' if nodes > 1 else ''} ({label})", result["compute"],
                             f"{result['decode_tps']:.2f}", f"{result['decode_tps'] / against:.2f}" if against else "-"])
    print_table(f"Peers: decode tokens/s, {model.name} model, {tokens} tokens, best of {repeats}",
                ["engine", "dtype/BLAS", "decode tok/s", "× llama.cpp (same node count)"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
