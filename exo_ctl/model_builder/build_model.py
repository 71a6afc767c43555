"""Build a small Llama-architecture model in Hugging Face layout, locally and deterministically.

No machine here reaches a model hub, so tests, benchmarks and the demo use a model this module
writes: ``config.json`` (model_type llama), ``model.safetensors`` (bf16, seeded weights) and a
byte-level BPE tokenizer trained with ``tokenizers`` on the text in ``corpus/`` beside this file.

    python -m exo_ctl.model_builder.build_model --size tiny [--out DIR]
"""
from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Bump whenever the recipe (architecture numbers, init, tokenizer, file layout) changes: cached
# models built by an older recipe are rebuilt.
RECIPE_VERSION = 1
STAMP_FILE = "exoctl-model.json"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

BOS, EOS, START_HEADER, END_HEADER, EOT, PAD = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>",
)
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]  # ids 0..5, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class ModelRecipe:
    """Architecture numbers of one size of the local test model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight tensor in Hugging Face Llama naming, in a fixed order."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.num_attention_heads * self.head_dim, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, self.num_attention_heads * self.head_dim),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def parameter_count(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.tensor_shapes().values())


SIZES: dict[str, ModelRecipe] = {
    # ~15.7M parameters, 8 layers: builds in a few seconds, for tests.
    "tiny": ModelRecipe(
        hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False,
    ),
    # ~152M parameters, 12 layers: for benchmarks.
    "small": ModelRecipe(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=True, seed=1,
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("EXO_MODEL_CACHE") or Path.home() / ".cache" / "exoctl" / "models")


def build_model(size: str = "tiny", *, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return the directory of the ``size`` model, building it when missing or stale."""
    return build_model_at(Path(cache_dir or default_cache_dir()) / size, size=size, force=force)


def build_model_at(path: Path, *, size: str = "tiny", force: bool = False) -> Path:
    """Build the ``size`` model into exactly ``path`` unless an up-to-date build is already there."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    recipe = SIZES[size]
    stamp = _stamp(size, recipe)
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time per target; others wait, then find it built.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _read_stamp(path) == stamp:
            return path
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        staging.chmod(0o755)
        try:
            _write_model(staging, recipe=recipe, stamp=stamp)
            if path.exists():
                shutil.rmtree(path)
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


# --- recipe stamp (the cache key) --------------------------------------------------------------

def _corpus_files() -> list[Path]:
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no corpus text (*.txt) in {CORPUS_DIR}")
    return files


def _stamp(size: str, recipe: ModelRecipe) -> dict:
    digest = hashlib.sha256()
    for file in _corpus_files():
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return {"recipeVersion": RECIPE_VERSION, "size": size, "recipe": asdict(recipe), "corpusSha256": digest.hexdigest()}


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


# --- writing -----------------------------------------------------------------------------------

def _write_model(out: Path, *, recipe: ModelRecipe, stamp: dict) -> None:
    write_tokenizer(out, vocab_size=recipe.vocab_size, max_length=recipe.max_position_embeddings)
    ids = {token: SPECIAL_TOKENS.index(token) for token in SPECIAL_TOKENS}
    _write_json(out / "config.json", {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_hidden_layers,
        "num_attention_heads": recipe.num_attention_heads,
        "num_key_value_heads": recipe.num_key_value_heads,
        "head_dim": recipe.head_dim,
        "vocab_size": recipe.vocab_size,
        "max_position_embeddings": recipe.max_position_embeddings,
        "rms_norm_eps": recipe.rms_norm_eps,
        "rope_theta": recipe.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": recipe.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[EOT]],
        "pad_token_id": ids[PAD],
    })
    _write_json(out / "generation_config.json", {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]})
    _write_safetensors(out / "model.safetensors", _init_weights(recipe), shapes=recipe.tensor_shapes())
    _write_json(out / STAMP_FILE, stamp)


def write_tokenizer(out: Path, *, vocab_size: int, max_length: int) -> None:
    """The local byte-level BPE tokenizer (at most ``vocab_size`` tokens) and its config files."""
    Path(out, "tokenizer.json").write_text(_trained_tokenizer_json(vocab_size))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOT, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOT, "pad_token": PAD})


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    return _train_tokenizer(vocab_size).to_str()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    if tokenizer.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than vocab_size {vocab_size}")
    return tokenizer


def _corpus_lines() -> Iterator[str]:
    for file in _corpus_files():
        yield from file.read_text(encoding="utf-8").splitlines(keepends=True)


def _init_weights(recipe: ModelRecipe) -> Iterator[tuple[str, np.ndarray]]:
    """Seeded Llama-style init: N(0, 0.02), output projections scaled by 1/sqrt(2L), norms = 1."""
    rng = np.random.default_rng(recipe.seed)
    residual_scale = 1.0 / np.sqrt(2.0 * recipe.num_hidden_layers)
    for name, shape in recipe.tensor_shapes().items():
        if name.endswith("norm.weight"):
            values = np.ones(shape, dtype=np.float32)
        else:
            std = recipe.init_std * (residual_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        yield name, _to_bfloat16(values)


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _write_safetensors(path: Path, tensors: Iterator[tuple[str, np.ndarray]], *, shapes: dict[str, tuple[int, ...]]) -> None:
    """Stream bf16 tensors into a safetensors file whose header is known up front."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, data in tensors:
            if tuple(data.shape) != shapes[name]:
                raise RuntimeError(f"{name}: built shape {data.shape} differs from the recipe's {shapes[name]}")
            f.write(np.ascontiguousarray(data).astype("<u2").tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo_ctl.model_builder.build_model", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="which model to build (default tiny)")
    parser.add_argument("--out", type=Path, help="model directory (default: $EXO_MODEL_CACHE or ~/.cache/exoctl/models, /SIZE)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    args = parser.parse_args(argv)
    path = build_model_at(args.out, size=args.size, force=args.force) if args.out else build_model(args.size, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
