"""Label selector parsing and matching."""
import pytest

from exo_ctl.api.selectors import SelectorError, parse_selector

LABELS = {"app": "llama", "tier": "gpu", "env": "prod"}


@pytest.mark.parametrize("text, expected", [
    ("", True),
    ("app=llama", True),
    ("app==llama", True),
    ("app=qwen", False),
    ("app!=qwen", True),
    ("missing!=x", True),
    ("app", True),
    ("missing", False),
    ("!missing", True),
    ("!app", False),
    ("env in (prod, staging)", True),
    ("env in (dev)", False),
    ("missing in (x)", False),
    ("env notin (dev,staging)", True),
    ("env notin (prod)", False),
    ("missing notin (x)", True),
    ("app=llama,tier=gpu,!missing", True),
    ("app=llama, tier=cpu", False),
    (" app = llama ", True),
    ("exo.dev/role", False),
])
def test_selector_matches_labels_like_kubernetes(text, expected):
    assert parse_selector(text).matches(LABELS) is expected


def test_selector_with_qualified_key_matches():
    assert parse_selector("exo.dev/role=worker").matches({"exo.dev/role": "worker"})


@pytest.mark.parametrize("text, problem", [
    ("app=llama,", "expected a label key"),
    ("app in x", 'expected "(" after "in"'),
    ("app in (a b)", 'expected "," or ")"'),
    ("app llama", 'expected "=", "==", "!=", "in" or "notin"'),
    ("=x", "expected a label key"),
    ("app=ll ama", 'expected "," between requirements'),
    ("-bad=x", "not a valid label key"),
    ("app=-x", "not a valid label value"),
])
def test_bad_selector_is_rejected_with_its_position(text, problem):
    with pytest.raises(SelectorError) as error:
        parse_selector(text)
    assert problem in str(error.value)
    assert "at position" in str(error.value)
