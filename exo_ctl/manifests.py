"""Load manifests from files, directories or stdin: multi-document YAML (or JSON), validated all
together, with errors that name the file and the line of the offending field."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import yaml

from exo_ctl.api.resources import KINDS, KindInfo, object_key
from exo_ctl.api.validation import InvalidObject, normalize

MAX_FILE_BYTES = 1024 * 1024
MAX_EXPANDED_NODES = 100_000  # YAML nodes a document may expand to through its aliases
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
STDIN = "-"



class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML that keeps timestamps as strings, as kubectl's YAML-to-JSON conversion does."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_PATH_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


class ManifestError(ValueError):
    """One or more manifests are unusable; each problem is a line naming file and line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Manifest:
    """One validated object and where it came from."""

    object: dict[str, Any]   # canonical form from ``normalize`` (namespace filled in)
    info: KindInfo
    source: str              # file path, or "<stdin>"
    line: int                # 1-based line of the document start

    @property
    def name(self) -> str:
        return self.object["metadata"]["name"]

    @property
    def namespace(self) -> str | None:
        return self.object["metadata"].get("namespace")

    @property
    def key(self) -> tuple[str, str, str]:
        return object_key(self.object)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Document:
    data: Any
    node: yaml.Node | None
    source: str
    path_prefix: tuple[str | int, ...] = ()


# --- finding files ---------------------------------------------------------------------------

def manifest_files(path: str, *, recursive: bool) -> list[Path]:
    """The manifest files named by ``path``: the file itself, or a directory's *.yaml, *.yml and
    *.json files (sorted; descending into subdirectories only when ``recursive``)."""
    root = Path(path)
    if not root.exists():
        raise ManifestError([f'the path "{path}" does not exist'])
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ManifestError([f'the path "{path}" is neither a file nor a directory'])
    found: list[Path] = []
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for folder, subdirs, names in walker:
        subdirs.sort()
        for name in names:
            candidate = Path(folder) / name
            if name.endswith(MANIFEST_SUFFIXES) and candidate.is_file():
                found.append(candidate)
    return sorted(found)


def _read_limited(stream: IO[bytes], source: str) -> str:
    data = stream.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError([f"{source}: larger than 1 MiB; split it into smaller files"])
    return _decode(data, source)


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ManifestError([f"{source}: not UTF-8 text (byte {error.start})"]) from None


def read_source(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ManifestError([f"{path}: {size} bytes is larger than 1 MiB; split it into smaller files"])
    try:
        with path.open("rb") as stream:
            return _read_limited(stream, str(path))
    except OSError as error:
        raise ManifestError([f"{path}: cannot read: {error.strerror or error}"]) from None


# --- parsing ---------------------------------------------------------------------------------

def _mapping_keys(node: yaml.Node, source: str) -> None:
    """YAML silently keeps the last of two equal keys; a manifest with one is a mistake."""
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            line = key.start_mark.line + 1
            if key.value in seen:
                raise ManifestError([f'{source}:{line}: duplicate key "{key.value}" (first at line {seen[key.value]})'])
            seen[key.value] = line


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_node_graph(root: yaml.Node, source: str) -> None:
    """Duplicate keys, and aliases that refer to themselves or expand to more than
    MAX_EXPANDED_NODES nodes (an "alias bomb"); each node is visited once, without recursion."""
    expanded: dict[int, int] = {}
    open_nodes: set[int] = set()   # the nodes whose subtree is being walked: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, walked = stack.pop()
        if walked:
            open_nodes.discard(id(node))
            expanded[id(node)] = size = 1 + sum(expanded[id(child)] for child in _children(node))
            if size > MAX_EXPANDED_NODES:
                raise ManifestError([f"{source}:{node.start_mark.line + 1}: its aliases expand to more than "
                                     f"{MAX_EXPANDED_NODES} YAML nodes"])
            continue
        if id(node) in expanded:
            continue
        if id(node) in open_nodes:
            raise ManifestError([f"{source}:{node.start_mark.line + 1}: an alias refers to a node that contains it"])
        if isinstance(node, yaml.MappingNode):
            _mapping_keys(node, source)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in expanded)


def _yaml_documents(text: str, source: str) -> list[Document]:
    loader = _Loader(text)
    documents: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_node_graph(node, source)
            documents.append(Document(loader.construct_document(node), node, source))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = error.problem or error.context or "invalid YAML"
        raise ManifestError([f"{where}: invalid YAML: {problem}"]) from None
    except yaml.YAMLError as error:
        raise ManifestError([f"{source}: invalid YAML: {error}"]) from None
    except ManifestError:
        raise
    except ValueError as error:  # a scalar the constructor cannot convert (an integer of 5,000 digits)
        raise ManifestError([f"{source}: invalid YAML: {error}"]) from None
    finally:
        loader.dispose()
    return documents


def _json_documents(text: str, source: str) -> list[Document]:
    try:
        data = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as error:
        raise ManifestError([f"{source}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}"]) from None
    except ValueError as error:  # an integer of 5,000 digits
        raise ManifestError([f"{source}: invalid JSON: {error}"]) from None
    except RecursionError:
        raise ManifestError([f"{source}: invalid JSON: nested too deeply"]) from None
    node = None
    try:  # JSON is (nearly always) YAML: compose it only to learn the line of each field.
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        pass
    return [Document(data, node, source)]


def parse_documents(text: str, *, source: str) -> list[Document]:
    """The non-empty documents of one file, with ``kind: List`` objects expanded."""
    documents = _json_documents(text, source) if source.endswith(".json") else _yaml_documents(text, source)
    out: list[Document] = []
    for document in documents:
        data = document.data
        if data is None:
            continue
        if isinstance(data, dict) and data.get("kind") == "List" and isinstance(data.get("items"), list):
            items_node = _child(document.node, "items")
            for index, item in enumerate(data["items"]):
                out.append(Document(item, _child(items_node, index), source, ("items", index)))
            continue
        out.append(document)
    return out


# --- mapping field paths to lines ------------------------------------------------------------

def _child(node: yaml.Node | None, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                return value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part]
    return None


def split_field_path(path: str) -> list[str | int]:
    """``spec.shards[2].node`` → ``["spec", "shards", 2, "node"]``."""
    return [int(index) if index else name for index, name in _PATH_PART.findall(path)]


def field_line(node: yaml.Node | None, path: str) -> int | None:
    """1-based line of the field at ``path`` (the line of its key), or of its nearest existing
    parent when the field itself is missing; None without a node."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    current: yaml.Node | None = node
    for part in split_field_path(path):
        if isinstance(current, yaml.MappingNode) and isinstance(part, str):
            match = next(((k, v) for k, v in current.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if match is None:
                return line
            line, current = match[0].start_mark.line + 1, match[1]
        elif (child := _child(current, part)) is not None:
            current, line = child, child.start_mark.line + 1
        else:
            return line
    return line


# --- validation ------------------------------------------------------------------------------

def _invalid_problems(error: InvalidObject, document: Document, start: int) -> list[str]:
    if not error.causes:
        return [f"{document.source}:{start}: {error.summary}"]
    located = [(field_line(document.node, cause.field) or start, cause) for cause in error.causes]
    if len(located) == 1:
        line, cause = located[0]
        return [f"{document.source}:{line}: {error.summary}: {cause}"]
    return [f"{document.source}:{start}: {error.summary}:"] + [
        f"  {document.source}:{line}: {cause}" for line, cause in located
    ]


def validate_document(document: Document, *, namespace: str | None) -> Manifest:
    """Normalize one document; ``namespace`` (from ``-n``) fills a missing namespace and must
    match an explicit one."""
    start = (document.node.start_mark.line + 1) if document.node is not None else 1
    data = document.data
    if not isinstance(data, dict):
        raise ManifestError([f"{document.source}:{start}: a manifest must be a mapping with apiVersion, kind, metadata and spec, "
                             f"got {type(data).__name__}"])
    try:
        obj = normalize(data)
    except InvalidObject as error:
        raise ManifestError(_invalid_problems(error, document, start)) from None
    info = KINDS[obj["kind"]]
    meta = obj["metadata"]
    if info.namespaced and namespace:
        given = (data.get("metadata") or {}).get("namespace")
        if given and given != namespace:
            line = field_line(document.node, "metadata.namespace") or start
            raise ManifestError([f'{document.source}:{line}: the namespace from the object ("{given}") does not match '
                                 f'--namespace "{namespace}"; pass --namespace={given} or remove one of them'])
        meta["namespace"] = namespace
    return Manifest(object=obj, info=info, source=document.source, line=start)


def load_manifests(paths: Sequence[str], *, recursive: bool = False, namespace: str | None = None,
                   stdin: IO[bytes] | None = None) -> list[Manifest]:
    """Every object in ``paths`` (files, directories, or ``-`` for stdin), validated. Any problem
    anywhere raises ManifestError listing all problems found, so that nothing is applied."""
    problems: list[str] = []
    manifests: list[Manifest] = []
    first_seen: dict[tuple[str, str, str], Manifest] = {}
    for path in paths:
        try:
            if path == STDIN:
                if stdin is None:
                    raise ManifestError(["cannot read manifests from stdin here"])
                sources = [("<stdin>", _read_limited(stdin, "<stdin>"))]
            else:
                sources = [(str(file), read_source(file)) for file in manifest_files(path, recursive=recursive)]
        except ManifestError as error:
            problems.extend(error.problems)
            continue
        for source, text in sources:
            try:
                documents = parse_documents(text, source=source)
            except ManifestError as error:
                problems.extend(error.problems)
                continue
            for document in documents:
                try:
                    manifest = validate_document(document, namespace=namespace)
                except ManifestError as error:
                    problems.extend(error.problems)
                    continue
                earlier = first_seen.get(manifest.key)
                if earlier is not None:
                    where = f" in namespace {manifest.namespace}" if manifest.namespace else ""
                    problems.append(f"{manifest.where}: duplicate object {manifest.info.ref(manifest.name)}{where} "
                                    f"(first defined at {earlier.where})")
                    continue
                first_seen[manifest.key] = manifest
                manifests.append(manifest)
    if problems:
        raise ManifestError(problems)
    return manifests
