"""``GET /openapi.json``: the node's OpenAPI 3.1 description, built from the app's route table.

Every operation of the node is described once, here (``OPERATIONS``); the document holds the
described routes that the app really has. The resource schemas come from the same pydantic models
as manifests/schema/, the sampling fields from the data path's ``SamplingParams``, the other OpenAI
request fields from the limits in ``openai_requests``. The route is public: it holds no secrets.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from exo_ctl.api.meta import API_VERSION
from exo_ctl.api.resources import KINDS, KindInfo
from reconciler.inference.backend import SamplingParams
from reconciler.consistency_check import CONSISTENCY_PATH
from reconciler.membership import MEMBERS_PATH
from reconciler.server import ollama_api, openai_requests
from reconciler.server.auth_tokens import TOKEN_PATH, TOKENS_PATH
from reconciler.server.bodies import MAX_BODY_BYTES, PATCH_MEDIA_TYPES
from reconciler.server.discovery import API_FALLBACK_PATH, DISCOVERY_PATHS, kind_subresources
from reconciler.server.events_routes import EVENT_ITEM_PATH, EVENT_PATHS
from reconciler.server.openapi_k8s import OPENAPI_FALLBACK_PATH
from reconciler.server.dashboard import THROUGHPUT_PATH
from reconciler.server.datapath_status import DATAPATH_PATH
from reconciler.server.query import OP_ID_HEADER
from reconciler.server.watch import WATCH_CONTENT_TYPE

OPENAPI_PATH = "/openapi.json"
Operation = dict[str, Any]
RouteKey = tuple[str, str]  # (METHOD, canonical path)
_REF = "#/components/schemas/{model}"
_BEARER = [{"bearer": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
              "description": "one server-sent event"}
_STATUS_ERROR = {"description": "an error, as a Kubernetes Status", "content": _json(_ref("Status"))}
_OPENAI_ERROR = {"description": "an error, in OpenAI's shape", "content": _json(_ref("OpenAIError"))}


def _op(summary: str, *, responses: dict[str, Any], secured: bool = True, parameters: list[Any] | None = None,
        body: dict[str, Any] | None = None, error: dict[str, Any] | None = _STATUS_ERROR) -> Operation:
    operation: Operation = {"summary": summary, "responses": dict(responses)}
    if error is not None:
        operation["responses"]["default"] = error
    if secured:
        operation["security"] = _BEARER
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    return operation


def _ok(description: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, **({"content": content} if content else {})}


# --- schemas -----------------------------------------------------------------------------------

def _resource_schemas() -> dict[str, Any]:
    """The kinds' JSON Schemas (the models behind manifests/schema/), their parts shared."""
    models = [(info.model, "validation") for info in KINDS.values()]
    refs, defs = models_json_schema(models, ref_template=_REF)
    schemas = dict(defs.get("$defs", {}))
    for info in KINDS.values():
        schemas[f"{info.kind}List"] = {
            "type": "object", "required": ["apiVersion", "kind", "metadata", "items"],
            "properties": {"apiVersion": {"const": API_VERSION}, "kind": {"const": f"{info.kind}List"},
                           "metadata": {"type": "object", "properties": {"resourceVersion": {"type": "string"}}},
                           "items": {"type": "array", "items": _ref(info.kind)}}}
    return schemas


_STATUS = {
    "type": "object", "required": ["kind", "apiVersion", "status", "message", "reason", "code"],
    "properties": {"kind": {"const": "Status"}, "apiVersion": {"const": "v1"}, "metadata": {"type": "object"},
                   "status": {"const": "Failure"}, "message": {"type": "string"}, "reason": {"type": "string"},
                   "code": {"type": "integer"}, "details": {"type": "object"}}}
_OPENAI_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _sampling_fields() -> dict[str, Any]:
    """The sampling fields as the data path's own SamplingParams checks them."""
    properties = SamplingParams.model_json_schema()["properties"]
    fields = {name: {k: v for k, v in properties[name].items() if k != "title"}
              for name in openai_requests.SAMPLING_FIELDS}
    fields["temperature"]["default"] = openai_requests.OPENAI_DEFAULT_TEMPERATURE
    return fields


def _generation_fields(max_tokens_fields: tuple[str, ...]) -> dict[str, Any]:
    """The sampling and streaming fields shared by chat and text completions."""
    fields: dict[str, Any] = {
        "model": {"type": "string", "minLength": 1, "description": "the deployment name or its served name"},
        "n": {"type": "integer", "minimum": 1, "maximum": openai_requests.MAX_CHOICES,
              "description": "choices, generated concurrently (at most the node's generation slots)"},
        "stream": {"type": "boolean", "default": False},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                           "description": "only with stream: true"},
        **_sampling_fields(),
        "stop": {"oneOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "maxItems": openai_requests.MAX_STOP_STRINGS,
                            "items": {"type": "string", "minLength": 1}}]},
    }
    for field in max_tokens_fields:
        fields[field] = {"type": "integer", "minimum": 1, "maximum": openai_requests.MAX_TOKENS_LIMIT,
                         "description": f"prompt tokens + this must fit the model's context length (default "
                                        f"{openai_requests.DEFAULT_MAX_TOKENS}, cut to what fits)"}
    return fields


_STREAM_OPTIONS = {"stream_options": {"required": ["stream"], "properties": {"stream": {"const": True}}}}


def _openai_schemas() -> dict[str, Any]:
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    content = [{"type": "string"}, {"type": "array", "items": text_part}]
    others = [role for role in openai_requests.CHAT_ROLES if role != "assistant"]
    message = {"oneOf": [
        {"type": "object", "required": ["role", "content"],
         "properties": {"role": {"enum": others}, "content": {"oneOf": content}}},
        {"type": "object", "required": ["role"], "description": "an assistant's content may be null or left out",
         "properties": {"role": {"const": "assistant"}, "content": {"oneOf": [*content, {"type": "null"}]}}}]}
    chat = {"type": "object", "required": ["model", "messages"], "dependentSchemas": _STREAM_OPTIONS, "properties": {
        **_generation_fields(("max_completion_tokens", "max_tokens")),
        "messages": {"type": "array", "minItems": 1, "items": message},
        "logprobs": {"type": ["boolean", "null"], "description": "each token's log-probability (after the penalties)"},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": openai_requests.MAX_TOP_LOGPROBS,
                         "description": "alternatives per token; only with logprobs: true"},
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": {"type": "object"},
                                                             "strict": {"type": "boolean"}}}},
            "description": "json_object and json_schema are enforced by constrained decoding (llguidance)"},
        "tools": {"type": "array", "description": "function tools, for models whose chat template and mlx-lm "
                  "tool parser call tools (others: 400)", "items": {"type": "object", "required": ["type", "function"],
                  "properties": {"type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                  "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64},
                                 "description": {"type": "string"}, "parameters": {"type": "object"}}}}}},
        "tool_choice": {"oneOf": [{"enum": ["auto", "none", "required"]}, {
            "type": "object", "required": ["type", "function"], "properties": {"type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}],
            "description": "required or a named function: enforced by constrained decoding (the call always "
                           "parses and matches the parameters)"}}}
    completion = {"type": "object", "required": ["model", "prompt"], "dependentSchemas": _STREAM_OPTIONS, "properties": {
        **_generation_fields(("max_tokens",)),
        "prompt": {"oneOf": [{"type": "string"},
                             {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string"}},
                             {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}],
                   "description": "text, or token ids (each below the model's vocabulary size)"},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": openai_requests.MAX_COMPLETION_LOGPROBS,
                     "description": "each token's log-probability with this many alternatives"},
        "echo": {"const": False}, "best_of": {"const": 1}}}
    usage = {"type": "object", "properties": {k: {"type": "integer", "minimum": 0}
                                              for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    model_card = {"type": "object", "required": ["id", "object"],
                  "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}
    return {
        "ChatCompletionRequest": chat, "CompletionRequest": completion,
        "Completion": {"type": "object", "required": ["id", "object", "choices"], "properties": {
            "id": {"type": "string"}, "object": {"enum": ["chat.completion", "text_completion"]},
            "choices": {"type": "array", "items": {"type": "object"}}, "usage": usage}},
        "Model": model_card,
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": model_card}}},
        "OpenAIError": _OPENAI_ERROR_SCHEMA,
    }


# --- operations --------------------------------------------------------------------------------

def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


_DRY_RUN = _query("dryRun", {"const": "All"}, "compute the write without committing it")
_OP_ID = {"name": OP_ID_HEADER, "in": "header", "required": False,
          "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
          "description": "a client-chosen operation id: a retried write applies at most once"}
_LIST_QUERY = [
    _query("labelSelector", {"type": "string"}, "e.g. app=chat,tier!=batch"),
    _query("watch", {"enum": ["true", "false", "1", "0"]}, "stream changes instead of listing"),
    _query("resourceVersion", {"type": "string", "pattern": "^[0-9]+$"}, "watch changes after this revision"),
    _query("timeoutSeconds", {"type": "integer", "minimum": 0}, "end a watch after this many seconds"),
    _query("fieldSelector", {"type": "string"}, "e.g. metadata.name=tiny,spec.nodeName!=node-a"),
    _query("limit", {"type": "integer", "minimum": 0}, "at most this many items; metadata.continue pages on"),
    _query("continue", {"type": "string"}, "the metadata.continue of the previous page"),
]


def _object_body(info: KindInfo, media_types: tuple[str, ...]) -> dict[str, Any]:
    return {"required": True, "description": f"a {info.kind} (at most {MAX_BODY_BYTES} bytes)",
            "content": {media: {"schema": _ref(info.kind)} for media in media_types}}


def _kind_operations(info: KindInfo) -> dict[RouteKey, Operation]:
    root = f"/apis/{API_VERSION}"
    collection = f"{root}/namespaces/{{namespace}}/{info.plural}" if info.namespaced else f"{root}/{info.plural}"
    item = collection + "/{name}"
    scope = [_path("namespace")] if info.namespaced else []
    named = [*scope, _path("name")]
    one = _ok(f"the {info.kind}", _json(_ref(info.kind)))
    listing = _ok(f"the {info.kind}s, or with watch=true a stream of events",
                  {"application/json": {"schema": _ref(f"{info.kind}List")},
                   WATCH_CONTENT_TYPE: {"schema": {"type": "string"}}})
    writes = ("application/json", "application/yaml")
    ops = {
        ("GET", collection): _op(f"list or watch {info.plural}", responses={"200": listing},
                                 parameters=[*scope, *_LIST_QUERY]),
        ("POST", collection): _op(f"create a {info.kind}", responses={"201": one}, parameters=[*scope, _DRY_RUN, _OP_ID],
                                  body=_object_body(info, writes)),
        ("GET", item): _op(f"read a {info.kind}", responses={"200": one}, parameters=named),
        ("PUT", item): _op(f"replace a {info.kind}", responses={"200": one}, parameters=[*named, _DRY_RUN, _OP_ID],
                           body=_object_body(info, writes)),
        ("PATCH", item): _op(f"patch (merge, strategic merge, JSON patch) or server-side apply a {info.kind}",
                             responses={"200": one, "201": one}, parameters=[*named, _DRY_RUN, _OP_ID],
                             body=_object_body(info, PATCH_MEDIA_TYPES)),
        ("DELETE", item): _op(f"delete a {info.kind}", responses={"200": one}, parameters=[*named, _DRY_RUN, _OP_ID],
                              body={"required": False, "content": _json({"type": "object", "properties": {
                                  "dryRun": {"type": "array", "items": {"const": "All"}},
                                  "preconditions": {"type": "object", "properties": {
                                      "resourceVersion": {"type": "string"}, "uid": {"type": "string"}}}}})}),
        ("GET", item + "/status"): _op(f"read a {info.kind} and its status", responses={"200": one}, parameters=named),
        ("PUT", item + "/status"): _op(f"replace a {info.kind}'s status", responses={"200": one},
                                       parameters=[*named, _DRY_RUN, _OP_ID], body=_object_body(info, writes)),
        ("PATCH", item + "/status"): _op(f"patch a {info.kind}'s status", responses={"200": one},
                                         parameters=[*named, _DRY_RUN, _OP_ID], body=_object_body(info, PATCH_MEDIA_TYPES)),
    }
    if "scale" in kind_subresources(info):
        scale = _ok("the autoscaling/v1 Scale of spec.replicas", _json({"type": "object"}))
        scale_body = {"required": True, "content": {m: {"schema": {"type": "object"}} for m in ("application/json", *PATCH_MEDIA_TYPES[1:])}}
        ops[("GET", item + "/scale")] = _op(f"read a {info.kind}'s scale", responses={"200": scale}, parameters=named)
        for method in ("PUT", "PATCH"):
            ops[(method, item + "/scale")] = _op(f"set a {info.kind}'s spec.replicas", responses={"200": scale},
                                                 parameters=[*named, _DRY_RUN], body=scale_body)
    if info.namespaced:
        ops[("GET", f"{root}/{info.plural}")] = _op(f"list or watch {info.plural} in every namespace",
                                                   responses={"200": listing}, parameters=_LIST_QUERY)
    return ops


def _openai_operations() -> dict[RouteKey, Operation]:
    def generation(schema: str) -> dict[str, Any]:
        return _op(f"generate ({schema})", error=_OPENAI_ERROR, responses={"200": _ok(
            "the completion, or with stream: true server-sent events",
            {"application/json": {"schema": _ref("Completion")}, "text/event-stream": {"schema": _SSE_EVENT}})},
            body={"required": True, "content": _json(_ref(schema))})
    return {
        ("GET", "/v1/models"): _op("the models this cluster serves", error=_OPENAI_ERROR,
                                   responses={"200": _ok("the models", _json(_ref("ModelList")))}),
        ("GET", "/v1/models/{model}"): _op("one model", error=_OPENAI_ERROR, parameters=[_path("model")],
                                           responses={"200": _ok("the model", _json(_ref("Model")))}),
        ("POST", "/v1/chat/completions"): generation("ChatCompletionRequest"),
        ("POST", "/v1/completions"): generation("CompletionRequest"),
        ("POST", "/v1/embeddings"): _op(
            "mean-pooled last hidden states (deployments with spec.serving.embeddings)", error=_OPENAI_ERROR,
            responses={"200": _ok("one vector per input, in order", _json({"type": "object", "required": [
                "object", "data", "model", "usage"]}))},
            body={"required": True, "content": _json({"type": "object", "required": ["model", "input"],
                  "additionalProperties": False, "properties": {
                      "model": {"type": "string", "minLength": 1}, "user": {"type": "string"},
                      "input": {"oneOf": [{"type": "string", "minLength": 1},
                                          {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                                          {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                                          {"type": "array", "minItems": 1, "items": {
                                              "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]},
                      "encoding_format": {"enum": ["float", "base64"], "default": "float"},
                      "dimensions": {"type": "integer", "description": "only the model's hidden size"}}})}),
        **_ollama_operations(),
        ("POST", "/v1/messages"): _op("Anthropic Messages API (text and tool use)", error={
            "description": "an error, in Anthropic's shape", "content": _json({"type": "object"})},
            responses={"200": _ok("the message, or with stream: true Anthropic's server-sent events", {
                "application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": _SSE_EVENT}})},
            body={"required": True, "content": _json({"type": "object", "required": ["model", "max_tokens", "messages"],
                  "properties": {"model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
                                 "messages": {"type": "array", "minItems": 1}, "system": {},
                                 "stop_sequences": {"type": "array", "items": {"type": "string"}},
                                 "temperature": {"type": "number"}, "top_p": {"type": "number"},
                                 "top_k": {"type": "integer"}, "stream": {"type": "boolean"},
                                 "tools": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                                 "tool_choice": {"type": "object", "required": ["type"], "properties": {
                                     "type": {"enum": ["auto", "any", "tool", "none"]}}}}})}),
    }


def _ollama_operations() -> dict[RouteKey, Operation]:
    """The Ollama API: a translation onto the OpenAI request path (server/ollama_api.py)."""
    error = {"description": "an error, in Ollama's shape", "content": _json({
        "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}})}
    options = {"type": "object", "description": "honoured: " + ", ".join(ollama_api.OPTIONS) + "; ignored (runtime): "
               + ", ".join(sorted(ollama_api.RUNTIME_OPTIONS)) + "; any other is a 400"}
    common = {"model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean", "default": True},
              "options": options, "format": {"oneOf": [{"const": "json"}, {"type": "object"}]}}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        **common, "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"]}}}}
    generate = {"type": "object", "required": ["model"], "properties": {
        **common, "prompt": {"type": "string"}, "system": {"type": "string"}, "raw": {"type": "boolean"}}}
    answer = {"application/json": {"schema": {"type": "object"}}, ollama_api.NDJSON: {"schema": {"type": "object"}}}

    def generation(summary: str, schema: dict[str, Any]) -> Operation:
        return _op(summary, error=error, responses={"200": _ok("the answer, or with stream: true NDJSON lines",
                                                                answer)},
                   body={"required": True, "content": _json(schema)})
    return {
        ("POST", "/api/chat"): generation("Ollama chat", chat),
        ("POST", "/api/generate"): generation("Ollama generate", generate),
        ("GET", "/api/tags"): _op("the ready models, Ollama's way", error=error,
                                  responses={"200": _ok("the models", _json({"type": "object"}))}),
        ("POST", "/api/show"): _op("one model, Ollama's way", error=error, responses={"200": _ok(
            "the model", _json({"type": "object"}))}, body={"required": True, "content": _json({
                "type": "object", "required": ["model"], "properties": {"model": {"type": "string"}}})}),
    }


def _node_operations() -> dict[RouteKey, Operation]:
    member = {"type": "object", "required": ["raftAddress", "nodeId", "apiUrl"], "properties": {
        "raftAddress": {"type": "string", "description": "HOST:PORT"}, "nodeId": {"type": "string"},
        "apiUrl": {"type": "string"}}}
    return {
        ("GET", "/healthz"): _op("the process answers", secured=False, error=None, responses={"200": _ok("ok", _TEXT)}),
        ("GET", "/readyz"): _op("this node's store has quorum", secured=False, error=None, responses={
            "200": _ok("ready", _TEXT), "503": _ok("no quorum", _TEXT)}),
        ("GET", OPENAPI_PATH): _op("this document", secured=False, error=None,
                                   responses={"200": _ok("OpenAPI 3.1", _json({"type": "object"}))}),
        ("GET", "/"): _op("the dashboard page", secured=False, error=None,
                          responses={"200": _ok("HTML", {"text/html": {"schema": {"type": "string"}}})}),
        ("GET", "/dashboard/{name}"): _op("a dashboard file", secured=False, parameters=[_path("name")],
                                          error={"description": "no such file", "content": _TEXT},
                                          responses={"200": _ok("the file")}),
        ("GET", THROUGHPUT_PATH): _op("tokens per second, as server-sent events (a stream that does not end)",
                                      secured=False, responses={"200": _ok(
                                          "events", {"text/event-stream": {"schema": _SSE_EVENT}})}),
        ("GET", "/metrics"): _op("Prometheus metrics", responses={"200": _ok("text format 0.0.4", _TEXT)}),
        ("GET", "/sd"): _op("Prometheus HTTP service discovery: every node's metrics target",
                            responses={"200": _ok("target groups", _json({"type": "array", "items": {"type": "object"}}))}),
        ("GET", MEMBERS_PATH): _op("the Raft members and leader", responses={"200": _ok(
            "members", _json({"type": "object"}))}),
        ("POST", MEMBERS_PATH): _op("admit a node to the Raft group (forwarded to the leader)", responses={
            "200": _ok("admitted", _json({"type": "object"}))}, body={"required": True, "content": _json(member)}),
        ("GET", CONSISTENCY_PATH): _op("this replica's state digests at its recent checkpoint revisions", responses={
            "200": _ok("checkpoint digests", _json({"type": "object"}))}),
        ("GET", DATAPATH_PATH): _op("what this node's stage server holds: shards, open requests, KV caches",
                                    responses={"200": _ok("data path status", _json({"type": "object"}))}),
    }


def _token_operations() -> dict[RouteKey, Operation]:
    view = {"type": "object", "properties": {k: {"type": t} for k, t in (
        ("id", "string"), ("role", "string"), ("description", "string"), ("created", "string"),
        ("expires", ["string", "null"]), ("revoked", "boolean"), ("state", "string"), ("createdBy", "string"))}}
    create = {"type": "object", "required": ["role"], "additionalProperties": False, "properties": {
        "role": {"enum": ["admin", "edit", "view", "inference"]}, "description": {"type": "string", "maxLength": 256},
        "ttlSeconds": {"type": "integer", "minimum": 1, "description": "the token expires this long after creation"}}}
    created = {**view, "properties": {**view["properties"], "token": {
        "type": "string", "description": "the token itself, shown only here"}}}
    return {
        ("GET", TOKENS_PATH): _op("the cluster's role tokens (admin; never their values)", responses={
            "200": _ok("tokens", _json({"type": "object", "properties": {"items": {"type": "array", "items": view}}}))}),
        ("POST", TOKENS_PATH): _op("mint a role token (admin)", body={"required": True, "content": _json(create)},
                                   responses={"201": _ok("the new token, with its value", _json(created))}),
        ("GET", TOKEN_PATH): _op("one token (admin)", parameters=[_path("id")],
                                 responses={"200": _ok("the token", _json(view))}),
        ("DELETE", TOKEN_PATH): _op("revoke a token: every node refuses it within 2 s (admin)",
                                    parameters=[_path("id")], responses={"200": _ok("the revoked token", _json(view))}),
    }


def _kubernetes_operations() -> dict[RouteKey, Operation]:
    """Discovery and the Kubernetes OpenAPI documents, what kubectl and the client libraries read first."""
    document = _ok("the document", _json({"type": "object"}))
    ops = {("GET", path): _op(f"Kubernetes discovery: {path}", secured=path.startswith("/api"), responses={"200": document})
           for path in DISCOVERY_PATHS}
    ops[("GET", API_FALLBACK_PATH)] = _op("unknown core API paths answer 404", parameters=[_path("rest")],
                                          responses={"404": _STATUS_ERROR})
    events = _ok("an EventList (or with watch=true a stream of events)", _json({"type": "object"}))
    for path in EVENT_PATHS:
        ops[("GET", path)] = _op("list or watch Events", responses={"200": events}, parameters=[
            *([_path("namespace")] if "{namespace}" in path else []), *_LIST_QUERY])
    ops[("GET", EVENT_ITEM_PATH)] = _op("read an Event", parameters=[_path("namespace"), _path("name")],
                                        responses={"200": _ok("the Event", _json({"type": "object"}))})
    for path in ("/openapi/v2", "/openapi/v3"):
        ops[("GET", path)] = _op(f"Kubernetes OpenAPI {path[-2:]} document", responses={"200": document})
    ops[("GET", "/openapi/v3/{path}")] = _op("the OpenAPI v3 document of one group version",
                                             parameters=[_path("path")], responses={"200": document})
    ops[("GET", OPENAPI_FALLBACK_PATH)] = _op("other /openapi paths answer 404",
                                              parameters=[_path("rest")], responses={"404": _STATUS_ERROR})
    return ops


def _all_operations() -> dict[RouteKey, Operation]:
    operations: dict[RouteKey, Operation] = _kubernetes_operations()
    for info in KINDS.values():
        operations.update(_kind_operations(info))
    operations.update(_openai_operations())
    operations.update(_node_operations())
    operations.update(_token_operations())
    return operations


OPERATIONS: dict[RouteKey, Operation] = _all_operations()


# --- the document ------------------------------------------------------------------------------

def app_routes(app: web.Application) -> set[RouteKey]:
    """(METHOD, canonical path) of every route of ``app``; HEAD twins of GET routes left out."""
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        routes.add((route.method, route.resource.canonical))
    return routes


def undescribed_routes(app: web.Application) -> list[RouteKey]:
    return sorted(app_routes(app) - OPERATIONS.keys())


def openapi_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the described routes that ``app`` has."""
    paths: dict[str, dict[str, Operation]] = {}
    for method, path in sorted(app_routes(app) & OPERATIONS.keys()):
        paths.setdefault(path, {})[method.lower()] = OPERATIONS[(method, path)]
    return {
        "openapi": "3.1.0",
        "info": {"title": "exo node API", "version": API_VERSION,
                 "description": "The control plane (exo.dev resources), the OpenAI-compatible API and the "
                                "node's own routes. The bearer token is a role token (admin, edit, view, inference)."},
        "paths": paths,
        "components": {"schemas": {**_resource_schemas(), **_openai_schemas(), "Status": _STATUS},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def add_openapi_route(app: web.Application) -> None:
    """Mount ``GET /openapi.json`` (public); the document is built at the first request, once
    every route is in place."""
    built: dict[str, Any] = {}

    async def serve(request: web.Request) -> web.Response:
        if not built:
            built.update(openapi_document(request.app))
        return web.json_response(built)

    app.router.add_get(OPENAPI_PATH, serve)
