"""Engine replicas on Ray Serve: an ingress deployment takes every HTTP request, computes its
routing key (routing.py) and forwards it, body and headers as received, to one replica of
the engine deployment, whose own FastAPI app (build_app) answers it; the answer streams
back chunk by chunk. Which replica: PrefixAwareRouter, a Ray Serve request router (the
deployment's request_router_config) around PrefixAffinity. A client that disconnects has
its ingress request cancelled by Serve; that cancels the replica's stream, which its app
sees as the disconnect (the generation is aborted). GET /metrics asks every replica.

    ostinato serve --replicas 2                          # a local Ray, cores split
    serve run ostinato.server.replicas.ray_app:app_builder replicas=4 threads=8   # a cluster
"""
# no `from __future__ import annotations`: Serve's class-based FastAPI routes read the
# annotations (Request) as objects
import asyncio
import logging
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import RequestRouter

from ..app import build_app
from ..protocol import Limits
from ..run import freeze_startup_heap
from ..transport import until_disconnect
from .asgi import call_app
from .metrics import ReplicaMetrics, merge
from .routing import PrefixAffinity, replica_cores, route_keys

log = logging.getLogger("ostinato.replicas")
ROUTER = "ostinato.server.replicas.ray_app:PrefixAwareRouter"
METRICS_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 2.0


class PrefixAwareRouter(RequestRouter):
    """Ranks the chosen replica first, the others after (Serve falls back to them if it
    refuses). The ingress passes route_keys (prefix hashes) as a keyword argument, or
    replica_index to reach one replica by its place in the sorted replica ids (/health,
    /metrics)."""

    def initialize_state(self, policy: str = "prefix", imbalance: int = 8, **kwargs):
        if kwargs:
            raise ValueError(f"PrefixAwareRouter: unknown settings {sorted(kwargs)}")
        self.policy = PrefixAffinity(policy, imbalance)
        self.routed_to: dict[str, str] = {}       # request id -> replica counted as its load

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered or pending_request is None:
            return [ordered]
        kwargs = pending_request.kwargs
        index = kwargs.get("replica_index")
        if index is not None:
            # never an empty answer (Serve would retry it for ever): while replicas start,
            # an index past the end reaches one already counted, and the caller sees its rank
            return [[ordered[index % len(ordered)]]]
        by_id = {r.replica_id.unique_id: r for r in ordered}
        keys = kwargs.get("route_keys") or []
        chosen = self.policy.choose(list(by_id), keys)
        self._count(pending_request, chosen, keys)
        return [[by_id[chosen]], [r for r in ordered if r is not by_id[chosen]]]

    def _count(self, pending_request, chosen: str, keys: list[str]) -> None:
        """Count the request as `chosen`'s load until on_request_completed; if Serve sends
        it elsewhere (the chosen one refused it), there; if it is never sent, nowhere."""
        request_id = pending_request.metadata.internal_request_id
        if request_id in self.routed_to:                    # chosen again: it moves
            self.policy.finished(self.routed_to.pop(request_id))
        self.policy.routed(chosen, keys)
        self.routed_to[request_id] = chosen

        def assigned(future) -> None:
            if self.routed_to.get(request_id) != chosen:    # chosen again since, or done
                return
            if future.cancelled() or future.exception() is not None:
                self.policy.finished(self.routed_to.pop(request_id))
                return
            actual = future.result().replica_id.unique_id
            if actual != chosen:
                self.policy.finished(chosen)
                self.policy.routed(actual, keys)
                self.routed_to[request_id] = actual
        pending_request.future.add_done_callback(assigned)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        replica = self.routed_to.pop(internal_request_id, None)
        if replica is not None:
            self.policy.finished(replica)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id.unique_id)


class EngineReplica:
    """One engine, pinned to its own cores, serving build_app's routes in process."""

    def __init__(self, model: str, name: str, threads: int, api_key: str | None,
                 limits: Limits, allowed_origins: list[str] | None, pooling: str,
                 llm_kwargs: dict):
        from ...llm import LLM
        rank = serve.get_replica_context().rank
        self.rank = rank.rank
        cores = replica_cores(rank.local_rank, threads, list(os.sched_getaffinity(0)))
        os.sched_setaffinity(0, cores)
        self.llm = LLM(model, threads=threads, **llm_kwargs)
        self.app = build_app(self.llm, name, api_key, limits, allowed_origins=allowed_origins,
                             pooling=pooling)
        self.app.state.server.start()
        log.warning("replica %d: %s on cores %s, %d thread(s)", self.rank, name, cores, threads)
        log.warning("replica %d: %s", self.rank, freeze_startup_heap())

    async def http(self, method: str, path: str, query: bytes, headers: list, body: bytes,
                   route_keys: list[str] | None = None):
        """The response's start, then its body chunks (route_keys: for the router only)."""
        async for item in call_app(self.app, method, path, query, headers, body):
            yield item

    async def health(self, replica_index: int | None = None) -> tuple[int, bool]:
        state = self.app.state.server
        return self.rank, (state.engine is not None and state.engine.error is None
                           and not state.draining)

    async def metrics(self, replica_index: int | None = None) -> ReplicaMetrics:
        kv = self.llm.engine.scheduler.kv
        return ReplicaMetrics(self.rank, self.app.state.server.metrics.render().decode(),
                              kv.prefix_queries, kv.prefix_hits)

    def __del__(self):
        app = getattr(self, "app", None)
        if app is not None:
            app.state.server.stop()


class _Relay(Response):
    """The replica's answer, relayed as it comes; a disconnect cancels the replica's stream."""

    def __init__(self, head: dict, stream):
        self.head, self.stream, self.background = head, stream, None
        self.status_code = head["status"]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.head["headers"]})
        finished = await until_disconnect(receive, self._pump(send))
        if finished is not True:
            self.stream.cancel()

    async def _pump(self, send) -> bool:
        try:
            async for chunk in self.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            return False
        return True


api = FastAPI(title="Ostinato replicas", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
@serve.ingress(api)
class Ingress:
    def __init__(self, engine, replicas: int):
        self.engine, self.replicas = engine, replicas

    async def each(self, method: str, timeout: float) -> list:
        """`method` of every replica (None for one that does not answer in time), one after
        another: calls made while serving one request share its request id, and Serve's
        router keeps one pending request per id."""
        async def ask(i: int):
            return await getattr(self.engine, method).remote(replica_index=i)

        async def one(i: int):
            try:
                return await asyncio.wait_for(ask(i), timeout)
            except Exception as e:          # noqa: BLE001 (a replica down: counted, not fatal)
                log.warning("replica %d's %s: %r", i, method, e)
                return None
        return [await one(i) for i in range(self.replicas)]

    @api.get("/health")
    async def health(self):
        """200 once every replica's engine is ready; 503 with how many are, meanwhile."""
        up = len({rank for rank, ok in filter(None, await self.each("health",
                                                                     HEALTH_TIMEOUT_S)) if ok})
        if up < self.replicas:
            return JSONResponse({"status": "loading", "replicas": self.replicas,
                                 "replicas_up": up}, 503)
        return {"status": "ok", "replicas": self.replicas}

    @api.get("/metrics")
    async def metrics(self):
        got = {m.rank: m for m in await self.each("metrics", METRICS_TIMEOUT_S) if m}
        text = merge([got[rank] for rank in sorted(got)], self.replicas)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"])
    async def forward(self, request: Request, path: str):
        body = await request.body()
        keys = route_keys(request.url.path, body) if request.method == "POST" else []
        stream = self.engine.options(stream=True).http.remote(
            request.method, request.url.path, request.url.query.encode(),
            list(request.headers.raw), body, route_keys=keys)
        try:
            head = await stream.__anext__()
        except StopAsyncIteration:
            return _unavailable("the replica gave no answer")
        except Exception as e:          # the replica died or could not be reached
            log.warning("forwarding %s %s failed: %r", request.method, request.url.path, e)
            stream.cancel()
            return _unavailable(f"no replica could answer: {type(e).__name__}")
        except BaseException:
            stream.cancel()         # cancelled (the client left) or failed: the replica stops
            raise
        return _Relay(head, stream)


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error",
                                   "param": None, "code": 503}}, 503)


def replica_app(model: str, *, replicas: int, routing: str = "prefix", imbalance: int = 8,
                threads: int | None = None, served_model_name: str | None = None,
                api_key: str | None = None, limits: Limits | None = None,
                allowed_origins: list[str] | None = None, pooling: str = "last",
                shutdown_timeout: float = 30.0, **llm_kwargs):
    """The Serve application: an Ingress in front of `replicas` EngineReplicas of `threads`
    threads each (default: this machine's cores shared out)."""
    from ...hub import model_name
    PrefixAffinity(routing, imbalance)              # bad values fail here, not in Serve
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, not {replicas}")
    threads = threads or max(1, len(os.sched_getaffinity(0)) // replicas)
    engine = serve.deployment(EngineReplica).options(
        name="OstinatoEngine", num_replicas=replicas,
        ray_actor_options={"num_cpus": threads}, max_ongoing_requests=100_000,
        graceful_shutdown_timeout_s=shutdown_timeout,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER,
            request_router_kwargs={"policy": routing, "imbalance": imbalance}))
    bound = engine.bind(model, served_model_name or model_name(model), threads, api_key,
                        limits or Limits(), allowed_origins, pooling, llm_kwargs)
    return Ingress.bind(bound, replicas)


def app_builder(args: dict):
    """`serve run ostinato.server.replicas.ray_app:app_builder model=... replicas=N
    [threads=T routing=prefix|least-loaded|random served_model_name=... api_key=...
    kv_cache_dir=DIR (shared by the replicas) kv_cache_disk_gb=GB]`."""
    known = {"model", "replicas", "threads", "routing", "served_model_name", "api_key",
             "max_model_len", "kv_cache_gb", "max_num_seqs", "kv_cache_dir",
             "kv_cache_disk_gb"}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(known)}")
    ints = {k: int(args[k]) for k in ("replicas", "threads", "max_model_len", "max_num_seqs")
            if k in args}
    extra = {k: float(args[k]) for k in ("kv_cache_gb", "kv_cache_disk_gb") if k in args}
    if "kv_cache_dir" in args:
        extra["kv_cache_dir"] = args["kv_cache_dir"]
    return replica_app(args.get("model", "smollm2-135m-instruct"),
                       **{"replicas": 2, **ints, **extra},
                       routing=args.get("routing", "prefix"),
                       served_model_name=args.get("served_model_name"),
                       api_key=args.get("api_key"))


def run_replicas(model: str, *, replicas: int, routing: str = "prefix", host: str = "127.0.0.1",
                 port: int = 8000, log_level: str = "info", **kwargs) -> None:
    """`ostinato serve --replicas N`: Ray Serve on a local Ray (or the cluster RAY_ADDRESS
    names) listening on host:port, until SIGTERM or Ctrl-C; kwargs go to replica_app."""
    import ray
    import signal
    import sys
    import threading

    from ...hub import EMBEDDED, resolve_model
    from ...loader.hf import is_hf_folder
    if model not in EMBEDDED and not is_hf_folder(model):
        resolve_model(model)            # a missing file fails now, not in a replica
    app = replica_app(model, replicas=replicas, routing=routing, **kwargs)
    cores = len(os.sched_getaffinity(0))
    threads = kwargs.get("threads") or max(1, cores // replicas)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
             num_cpus=None if os.environ.get("RAY_ADDRESS") else max(cores, replicas * threads),
             logging_level=log_level.upper())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="ostinato", route_prefix="/")
        print(f"{replicas} replicas of {model} ({threads} thread(s) each, {routing} routing) "
              f"serving at http://{host}:{port}/v1", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
