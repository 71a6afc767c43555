"""What the planner reserves for a stage is what that stage really loads."""
import pytest

from exo_ctl.model_builder.build_family import build_family_model
from reconciler.models.metadata import profile_from_directory
from reconciler.runtime import load_shard

CASES = [("llama", None), ("gemma3_text", None), ("gemma3", None), ("qwen3", None), ("qwen3_moe", None), ("llama", 4)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {(family, bits): build_family_model(family, root / f"{family}-{bits}", quantize_bits=bits)
            for family, bits in CASES}


@pytest.mark.parametrize("family, bits", CASES)
def test_each_stage_loads_within_five_percent_of_its_planned_bytes(built, family, bits):
    path = built[(family, bits)]
    profile = profile_from_directory(path)
    n = profile.num_layers
    for start, end in [(0, 1), (1, n - 1), (n - 1, n), (0, n)]:
        shard = load_shard(path, start=start, end=end)
        try:
            planned = profile.stage_bytes(start, end, first=start == 0, last=end == n)
            assert abs(shard.nbytes - planned) <= 0.05 * planned, (start, end, shard.nbytes, planned)
        finally:
            shard.close()


def test_a_gemma3_checkpoint_without_lm_head_is_planned_as_tied(built):
    profile = profile_from_directory(built[("gemma3_text", None)])
    assert profile.tie_word_embeddings
    assert profile.stage_bytes(3, 4, first=False, last=True) > profile.embedding_bytes
