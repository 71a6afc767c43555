"""A stage samples with mlx-lm's own sampling, one random key per request."""
import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from reconciler.datapath.sampling import RequestSampler
from reconciler.datapath.wire import SamplingParams


def _logprobs(seed: int) -> mx.array:
    logits = mx.random.normal((1, 64), key=mx.random.key(seed)) * 3
    return logits - mx.logsumexp(logits, keepdims=True)


def test_a_seeded_request_draws_what_mlx_lm_draws_after_seeding():
    logprobs = _logprobs(1)
    for params in (SamplingParams(temperature=0.8, top_p=0.9, seed=7), SamplingParams(temperature=1.3, seed=11)):
        mlx_lm_sampler = make_sampler(temp=params.temperature, top_p=params.top_p)
        mx.random.seed(params.seed)
        expected = [mlx_lm_sampler(logprobs).item() for _ in range(12)]
        ours = RequestSampler(params)
        assert [ours(logprobs) for _ in range(12)] == expected
        assert len(set(expected)) > 1  # really sampled, not greedy


def test_interleaved_requests_do_not_change_each_others_draws():
    logprobs = _logprobs(2)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=5)
    alone = RequestSampler(params)
    solo = [alone(logprobs) for _ in range(10)]
    first, other = RequestSampler(params), RequestSampler(SamplingParams(temperature=1.0, seed=99))
    mixed = []
    for _ in range(10):
        other(logprobs)
        mx.random.seed(123)  # anything else in the process using mlx's global random state
        mixed.append(first(logprobs))
    assert mixed == solo


def test_temperature_zero_is_the_argmax():
    logprobs = _logprobs(3)
    assert RequestSampler(SamplingParams())(logprobs) == int(mx.argmax(logprobs, axis=-1).item())
