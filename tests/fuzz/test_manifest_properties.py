"""Property tests of the manifest loader: whatever bytes, text or YAML-shaped documents it is
given, it loads them or raises ManifestError naming the source — never another exception.

    FUZZ_SEED=1234 uv run pytest -q tests/fuzz/test_manifest_properties.py -s
"""
from __future__ import annotations

import io
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from exo_ctl.manifests import ManifestError, load_manifests
from tests.fuzz.seeds import SEED, examples

EXAMPLES = examples(300)
TINY = (Path(__file__).resolve().parents[2] / "manifests" / "tiny.yaml").read_text()
FIELDS = ["apiVersion", "kind", "metadata", "spec", "status", "name", "namespace", "labels", "annotations",
          "model", "source", "replicas", "placement", "strategy", "nodeSelector", "minNodes", "maxNodes",
          "resources", "memoryHeadroom", "items", "layers", "start", "end", "dtype", "revision"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.sampled_from(["exo.dev/v1alpha1", "ModelDeployment", "Node", "Shard", "List", "Pack",
                                     "Spread", "hf://org/name", "/models/x", "16Gi", "-1", "default", ""]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6)),
    max_leaves=30)
YAML_SNIPPETS = st.sampled_from(["&a [*a]", "*undefined", "&x {a: 1}", "<<: *x", "!!binary Zm9v", "!!set {a}",
                                 "? [1]\n: 2", "---", "...", "- ", ": ", "{", "[", "'", '"', "\t", "#", "|\n  x",
                                 "!!python/object:os.system {}", "%YAML 1.1\n---", "9" * 5000, "\ufeff", "\x00"])


def load(data: bytes, *, namespace: str | None = None) -> None:
    try:
        load_manifests(["-"], stdin=io.BytesIO(data), namespace=namespace)
    except ManifestError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)


def fuzz_settings(function):
    return seed(SEED)(settings(max_examples=EXAMPLES, deadline=None, database=None,
                               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(function))


@fuzz_settings
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_load_or_raise_a_manifest_error(data: bytes) -> None:
    load(data)


@fuzz_settings
@given(st.text(max_size=2000))
def test_arbitrary_text_loads_or_raises_a_manifest_error(text: str) -> None:
    load(text.encode("utf-8", "surrogatepass"))


@fuzz_settings
@given(st.lists(VALUES, min_size=1, max_size=3), st.sampled_from([None, "default", "other"]))
def test_yaml_shaped_documents_load_or_raise_a_manifest_error(documents: list, namespace: str | None) -> None:
    load(yaml.safe_dump_all(documents).encode(), namespace=namespace)


@fuzz_settings
@given(st.data())
def test_a_mutated_reference_manifest_loads_or_raises_a_manifest_error(data: st.DataObject) -> None:
    text = TINY
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 20))
        insert = data.draw(YAML_SNIPPETS | st.text(max_size=10))
        text = text[:at] + insert + text[at + cut:]
    load(text.encode("utf-8", "surrogatepass"))


def test_alias_bombs_and_self_referring_aliases_are_refused_quickly() -> None:
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdef", "bcdefg"))
    for text, problem in ((bomb, "expand to more than"), ("a: &a [*a]\n", "refers to a node that contains it")):
        try:
            load_manifests(["-"], stdin=io.BytesIO(text.encode()))
        except ManifestError as error:
            assert problem in str(error), error
        else:
            raise AssertionError(f"loaded {text!r}")


def test_numbers_too_long_to_convert_and_deep_json_name_the_source(tmp_path: Path) -> None:
    cases = {"deep.json": "[" * 100_000 + "]" * 100_000, "long.json": "9" * 5000, "long.yaml": "a: " + "9" * 5000}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        try:
            load_manifests([str(tmp_path / name)])
        except ManifestError as error:
            assert str(error).startswith(str(tmp_path / name)), error
        else:
            raise AssertionError(f"loaded {name}")
