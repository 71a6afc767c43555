"""``GET /internal/v1/datapath``: what this node's stage server holds right now — the shards it
serves, requests open on each, and KV caches still in memory. Operators and tests use it to see
that finished, cancelled or abandoned requests leave nothing behind."""
from __future__ import annotations

from aiohttp import web

from reconciler.datapath.stage import StageServer

DATAPATH_PATH = "/internal/v1/datapath"


def datapath_status(stage_server: StageServer) -> dict:
    """``mlxActiveMemoryBytes`` is MLX's count of bytes in live arrays (weights + KV caches +
    activations); ``bufferedBytes`` what the stage holds for peers now, at most
    ``bufferBoundBytes`` per connection (or one frame when a single frame is larger)."""
    return {"port": stage_server.port,
            "shards": {name: stage_server.active_requests(name) for name in stage_server.shard_names()},
            "activeRequests": stage_server.active_requests(),
            "kvCaches": stage_server.kv_caches(),
            "mlxActiveMemoryBytes": stage_server.mlx_active_memory(),
            "bufferedBytes": stage_server.buffered_bytes(),
            "bufferBoundBytes": stage_server.max_buffered_bytes}


def add_datapath_routes(app: web.Application, *, stage_server: StageServer) -> None:
    """Mount the read-only status route (under /internal, so it needs the cluster token)."""
    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(datapath_status(stage_server))

    app.router.add_get(DATAPATH_PATH, get_status)
