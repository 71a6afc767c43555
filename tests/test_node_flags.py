"""The node's serving flags: defaults, carried into NodeOptions, and refused with the flag named."""
from __future__ import annotations

import pytest

from reconciler.config import ConfigError, prepare_model_cache
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


def test_an_unreferenced_model_info_is_kept_an_hour_unless_the_flag_says_otherwise():
    assert node_options(parse_args([])).model_info_retention == 3600.0
    assert node_options(parse_args(["--model-info-retention", "60"])).model_info_retention == 60.0


@pytest.mark.parametrize(("argv", "flag"), [(["--max-concurrent-requests", "0"], "--max-concurrent-requests"),
                                            (["--max-queued-requests", "-1"], "--max-queued-requests"),
                                            (["--request-idle-timeout", "0"], "--request-idle-timeout"),
                                            (["--prefill-chunk", "0"], "--prefill-chunk"),
                                            (["--model-info-retention", "0"], "--model-info-retention"),
                                            (["--model-info-retention", "nan"], "--model-info-retention"),
                                            (["--node-grace", "nan"], "--node-grace")])
def test_an_admission_flag_out_of_range_is_a_config_error_naming_it(argv, flag):
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        node_options(parse_args(argv))


def test_weights_flags_default_to_no_cache_limit_256mi_served_per_second_and_four_fetches_at_once():
    options = node_options(parse_args([]))
    assert (options.model_cache, options.model_cache_size) == (None, None)
    assert (options.weights_serve_rate, options.weights_fetch_parallel) == (256 * 2**20, 4)


def test_weights_flags_take_kubernetes_quantities_and_reach_the_node_options(tmp_path):
    options = node_options(parse_args(["--model-cache", str(tmp_path / "cache"), "--model-cache-size", "50Gi",
                                       "--weights-serve-rate", "100M", "--weights-fetch-parallel", "8"]))
    assert options.model_cache == tmp_path / "cache"
    assert (options.model_cache_size, options.weights_serve_rate, options.weights_fetch_parallel) == \
        (50 * 2**30, 100_000_000, 8)


@pytest.mark.parametrize(("argv", "flag"), [(["--model-cache-size", "lots"], "--model-cache-size"),
                                            (["--weights-serve-rate", "0"], "--weights-serve-rate"),
                                            (["--weights-serve-rate", "fast"], "--weights-serve-rate"),
                                            (["--weights-fetch-parallel", "0"], "--weights-fetch-parallel")])
def test_a_weights_flag_out_of_range_is_a_config_error_naming_it(argv, flag):
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        node_options(parse_args(argv))


def test_the_model_cache_is_made_in_the_data_dir_unless_the_flag_puts_it_elsewhere(tmp_path):
    assert prepare_model_cache(None, tmp_path / "data") == tmp_path / "data" / "models"
    assert (tmp_path / "data" / "models").is_dir()
    assert prepare_model_cache(tmp_path / "elsewhere", tmp_path / "data") == tmp_path / "elsewhere"


def test_a_model_cache_that_cannot_be_a_directory_is_a_config_error_naming_the_flag(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match=f"^--model-cache: cannot create {tmp_path / 'file'}"):
        prepare_model_cache(tmp_path / "file", tmp_path / "data")


def test_the_weights_flags_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model-cache DIR", "--model-cache-size SIZE", "--weights-serve-rate RATE",
                 "--weights-fetch-parallel N"):
        assert flag in text
