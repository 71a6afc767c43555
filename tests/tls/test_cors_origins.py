"""``--cors-origin`` takes browser origins exactly as they arrive in ``Origin`` and names the flag otherwise."""
import pytest

from reconciler.config import ConfigError
from reconciler.main import node_options, parse_args
from reconciler.server.cors import parse_origin


def test_an_origin_is_kept_as_browsers_send_it():
    assert parse_origin("https://App.Example.com:8443") == "https://app.example.com:8443"
    assert parse_origin("http://localhost:3000/") == "http://localhost:3000"


@pytest.mark.parametrize("value", ["app.example.com", "https://app.example.com/path", "ftp://x", "https://x?q=1"])
def test_anything_but_an_origin_is_refused_naming_the_flag(value):
    with pytest.raises(ConfigError, match="--cors-origin"):
        node_options(parse_args(["--cors-origin", value]))


def test_the_flag_repeats_and_defaults_to_same_origin_only():
    assert node_options(parse_args([])).cors_origins == ()
    options = node_options(parse_args(["--cors-origin", "https://a.example", "--cors-origin", "http://b:1"]))
    assert options.cors_origins == ("https://a.example", "http://b:1")
