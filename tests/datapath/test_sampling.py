"""The last stage's penalties, bias and filters are mlx-lm's own, applied per request."""
import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from pydantic import ValidationError

from reconciler.datapath.sampled import Sampled, token_meta
from reconciler.datapath.sampling import RequestSampler
from reconciler.datapath.wire import PENALTY_WINDOW, SamplingParams, WireError


def _logits(seed: int, vocab: int = 64) -> mx.array:
    return mx.random.normal((1, vocab), key=mx.random.key(seed)) * 3


def _mlx_lm_tokens(params: SamplingParams, logits: mx.array, steps: int) -> list[int]:
    """What mlx-lm's generate_step draws: processors over the token history, then its sampler."""
    processors = make_logits_processors(
        logit_bias={int(k): v for k, v in params.logit_bias.items()} or None,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty)
    sampler = make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k)
    if params.seed is not None:
        mx.random.seed(params.seed)
    history, drawn = list(params.prompt_tail), []
    for _ in range(steps):
        step = logits * 1  # mlx-lm's processors write into the logits they get
        for process in processors:
            step = process(mx.array(history[-PENALTY_WINDOW:], dtype=mx.int32), step)
        token = sampler(step - mx.logsumexp(step, axis=-1, keepdims=True)).item()
        history.append(token)
        drawn.append(token)
    return drawn


@pytest.mark.parametrize("params", [
    SamplingParams(presence_penalty=1.5, prompt_tail=[3, 4]),
    SamplingParams(frequency_penalty=0.7),
    SamplingParams(repetition_penalty=1.8, prompt_tail=[1]),
    SamplingParams(temperature=0.9, seed=4, top_k=5, min_p=0.05, presence_penalty=0.5),
    SamplingParams(temperature=1.0, seed=8, logit_bias={"2": 5.0, "9": -100.0}),
])
def test_each_request_draws_what_mlx_lm_draws_with_the_same_processors(params):
    logits = _logits(5)
    ours = RequestSampler(params)
    assert [ours(logits * 1) for _ in range(10)] == _mlx_lm_tokens(params, logits, 10)


def test_a_presence_penalty_keeps_greedy_decoding_from_repeating_one_token():
    logits = _logits(6)
    plain, penalized = RequestSampler(SamplingParams()), RequestSampler(SamplingParams(presence_penalty=2.0,
                                                                                       frequency_penalty=2.0))
    assert len({plain(logits * 1) for _ in range(6)}) == 1
    assert len({penalized(logits * 1) for _ in range(6)}) > 1


def test_logit_bias_forces_or_bans_a_token():
    logits = _logits(7)
    best = int(mx.argmax(logits, axis=-1).item())
    assert RequestSampler(SamplingParams(logit_bias={"11": 100.0}))(logits) == 11
    assert RequestSampler(SamplingParams(logit_bias={str(best): -100.0}))(logits) != best


def test_top_k_of_one_samples_the_argmax_even_when_hot():
    logits = _logits(8)
    sampler = RequestSampler(SamplingParams(temperature=2.0, seed=3, top_k=1))
    assert {sampler(logits) for _ in range(8)} == {int(mx.argmax(logits, axis=-1).item())}


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    logits = _logits(9)
    wide = RequestSampler(SamplingParams(temperature=1.0, seed=2, top_k=1000))
    plain = RequestSampler(SamplingParams(temperature=1.0, seed=2))
    assert [wide(logits) for _ in range(8)] == [plain(logits) for _ in range(8)]


@pytest.mark.parametrize(("fields", "field"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": {"3": 101.0}}, "logit_bias"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_k": -1}, "top_k"),
    ({"prompt_tail": list(range(PENALTY_WINDOW + 1))}, "prompt_tail"),
])
def test_out_of_range_sampling_fields_are_refused_naming_the_field(fields, field):
    with pytest.raises(ValidationError) as error:
        SamplingParams(**fields)
    assert error.value.errors()[0]["loc"][0] == field


def test_a_request_asking_for_logprobs_gets_the_token_with_its_top_alternatives():
    logits = _logits(10)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sampled = RequestSampler(SamplingParams(logprobs=3))(logits * 1)
    best = mx.argsort(-logprobs[0])[:3].tolist()
    assert int(sampled) == best[0] and [token for token, _ in sampled.top] == best
    assert sampled.logprob == pytest.approx(logprobs[0, best[0]].item(), abs=1e-5)
    assert Sampled.from_meta(int(sampled), token_meta(sampled)).top == sampled.top


def test_without_logprobs_the_token_is_a_plain_id_and_its_frame_carries_no_metadata():
    token = RequestSampler(SamplingParams())(_logits(11))
    assert type(token) is int and token_meta(token) is None


def test_token_metadata_that_is_not_logprobs_is_a_wire_error():
    with pytest.raises(WireError, match="log-probabilities"):
        Sampled.from_meta(3, {"top": "many"})
