"""The root conftest's rule, run in a fresh pytest session with the real tests/conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
SKIPPING_TESTS = """
import shutil
import pytest

def test_needs_a_missing_tool():
    if shutil.which("no-such-tool-anywhere") is None:
        pytest.skip("no no-such-tool-anywhere binary")

@pytest.mark.skipif(True, reason="no chromium")
def test_marked_skipif():
    pass

@pytest.mark.xfail(reason="known bug", strict=False)
def test_expected_failure():
    assert False

def test_that_runs():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_tools=SKIPPING_TESTS)
    return pytester


def test_without_ci_a_missing_tool_is_a_skip(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)


def test_under_ci_every_skip_fails_with_its_reason(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=1, xfailed=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*test_needs_a_missing_tool was skipped under CI=true*no no-such-tool-anywhere*"])
    result.stdout.fnmatch_lines(["*test_marked_skipif was skipped under CI=true*no chromium*"])


def test_under_ci_a_module_level_skip_fails_the_run(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    suite.makepyfile(test_optional='import pytest\npytest.importorskip("no_such_module_anywhere")\n')
    result = suite.runpytest("-p", "no:cacheprovider", "test_optional.py")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*test_optional.py was skipped under CI=true*no_such_module_anywhere*"])


def test_under_ci_only_an_allowlisted_skip_stays_a_skip(pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    allow = '\nCI_SKIP_ALLOWLIST["test_tools.py::test_marked_skipif"] = "macOS only"\n'
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST.read_text() + allow)
    pytester.makepyfile(test_tools=SKIPPING_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1)
