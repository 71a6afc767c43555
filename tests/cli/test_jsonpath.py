"""Our JSONPath templates (exoctl get -o jsonpath=...) print what kubectl's do on the same objects."""
from __future__ import annotations

import asyncio
import os
import sys

import pytest

from exo_ctl.cli import jsonpath
from tests.kubectl.conftest import TOKEN, kube  # noqa: F401 — the fixture
from tests.kubectl.test_kubectl_verbs import manifest, ready

TEMPLATES = [
    "{.items[*].metadata.name}",
    "{.items[0].spec}",
    "{.items[0]}",
    "{.items[-1].metadata.labels.app}",
    "{.items[1:].metadata.name}",
    '{range .items[*]}{.metadata.name}{"\\t"}{.spec.replicas}{"\\n"}{end}',
    'names: {range .items[*]}[{.metadata.name}]{end} done',
    '{.items[*].status.conditions[?(@.type=="Ready")].status}',
    '{.items[?(@.spec.replicas>1)].metadata.name}',
    "{.items[*].metadata.labels['app']}",
    "{..source}",
    "{.items[*].spec.missing}",
    "{.kind}",
]


async def exoctl(kube, tmp_path, *args: str) -> tuple[int, str, str]:  # noqa: F811
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exo_ctl.cli.main", "--server", kube.server, "--token", TOKEN, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "EXOCTL_CA": str(kube.ca_file), "XDG_CONFIG_HOME": str(tmp_path)})
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


async def test_every_template_prints_what_kubectl_prints(kube):  # noqa: F811
    await kube("apply", "-f", "-", stdin=manifest("alpha", replicas=1, labels="{app: chat}"))
    await kube("apply", "-f", "-", stdin=manifest("beta", replicas=3, labels="{app: code}"))
    await ready(kube, "alpha")
    document = (await kube("get", "md", "-o", "json", "--show-managed-fields")).json()
    for template in TEMPLATES:
        expected = (await kube("get", "md", "-o", f"jsonpath={template}")).stdout
        assert jsonpath.render(template, document) == expected, template


async def test_exoctl_get_jsonpath_matches_kubectl_and_a_bad_template_exits_one(kube, tmp_path):  # noqa: F811
    await kube("apply", "-f", "-", stdin=manifest("alpha"))
    await ready(kube, "alpha")
    template = '{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}'
    code, out, err = await exoctl(kube, tmp_path, "get", "md", "-o", f"jsonpath={template}")
    assert code == 0, err
    assert out == (await kube("get", "md", "-o", f"jsonpath={template}")).stdout == "alpha=True\n"
    code, out, err = await exoctl(kube, tmp_path, "get", "md", "alpha", "-o", "jsonpath={.spec.replicas}")
    assert (code, out) == (0, "1")
    code, out, err = await exoctl(kube, tmp_path, "get", "md", "-o", "jsonpath={.items[0]")
    assert code == 1 and "error parsing jsonpath" in err and "unclosed action" in err and out == ""


@pytest.mark.parametrize("template, message", [
    ("{range .items[*]}{.a}", "{range} without a matching {end}"),
    ("{.a}{end}", "{end} without a matching {range}"),
    ("{.items[x]}", "invalid array index [x]"),
    ("{.items[?(@.a==)]}", "invalid filter"),
    ("{items}", "unrecognized identifier"),
])
def test_a_bad_template_names_what_is_wrong(template, message):
    with pytest.raises(jsonpath.JsonPathError, match=message.replace("[", r"\[").replace("{", r"\{")):
        jsonpath.parse(template)
