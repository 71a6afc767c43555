"""The node's serving flags: defaults, carried into NodeOptions, and refused with the flag named."""
from __future__ import annotations

import pytest

from reconciler.config import ConfigError
from reconciler.main import node_options, parse_args


def test_admission_flags_default_to_eight_generating_and_thirty_two_queued():
    options = node_options(parse_args([]))
    assert (options.max_concurrent_requests, options.max_queued_requests) == (8, 32)


def test_admission_flags_reach_the_node_options():
    options = node_options(parse_args(["--max-concurrent-requests", "2", "--max-queued-requests", "0"]))
    assert (options.max_concurrent_requests, options.max_queued_requests) == (2, 0)


def test_serving_flags_default_to_a_minute_of_idleness_and_128_token_prefill_steps():
    options = node_options(parse_args([]))
    assert (options.request_idle_timeout, options.prefill_chunk) == (60.0, 128)
    options = node_options(parse_args(["--request-idle-timeout", "2.5", "--prefill-chunk", "512"]))
    assert (options.request_idle_timeout, options.prefill_chunk) == (2.5, 512)


@pytest.mark.parametrize(("argv", "flag"), [(["--max-concurrent-requests", "0"], "--max-concurrent-requests"),
                                            (["--max-queued-requests", "-1"], "--max-queued-requests"),
                                            (["--request-idle-timeout", "0"], "--request-idle-timeout"),
                                            (["--prefill-chunk", "0"], "--prefill-chunk")])
def test_an_admission_flag_out_of_range_is_a_config_error_naming_it(argv, flag):
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        node_options(parse_args(argv))
