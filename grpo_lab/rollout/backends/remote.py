"""Engines in their own processes: the :class:`~grpo_lab.rollout.backend.Backend`
protocol over their OpenAI-compatible endpoints (``python -m grpo_lab.serve``), and the
weights pushed to them over ``torch.distributed``.

Generation: a prompt's token ids go to ``/v1/completions`` (``prompt`` as ids,
``logprobs=1``), and the answer's ids and log-probs come back as the engine sampled
them. A :class:`Router` spreads the requests: a prompt goes where the same prompt went
last (a group's members meet in one engine's prefix cache), else to the engine with the
fewest requests in flight.

Weights: the trainer (rank 0) and the engines (ranks 1..N) form a process group of their
own (gloo; :mod:`~grpo_lab.rollout.backends.weight_stream`), set up once through ``/v1/weights/connect``; each push
is one ``/v1/weights/update`` call per engine, after which the trainer broadcasts the
tensors one at a time, each preceded by a small header (name, dtype, shape), so that
no side holds more than one tensor beyond its model. Every push carries a version; the
engine answers with it, and every completion names the version that produced it.

LoRA runs push the adapter alone (``/v1/weights/update`` names its config); the engine
wraps its base model in it at the first push.

Departures, stated: a turn after the first of a conversation goes to the
least-loaded engine, not necessarily its group's (its prompt is new to every engine).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

from torch import Tensor

from ..backend import BatchStream, Completion, EngineError, SamplingParams, per_request
from .engine_processes import EngineProcesses
from .router import Router
from .weight_stream import adapter_config_dict, free_port, send_tensors, weight_group

__all__ = ["EngineError", "EngineProcesses", "EngineUnreachable", "RemoteBackend", "Router"]


class EngineUnreachable(EngineError):
    """An engine that could not be reached at all (refused, reset, timed out): its
    requests can go to another engine."""


class RemoteBackend:
    """Engines at ``urls`` (their ``/v1`` base URLs), called with the run's ``api_key``.

    Several trainer processes (``share``: rank 0's object on every rank, a collective)
    share the engines: rank 0 (the ``pusher``) pushes, and a push returns on every rank
    once it is done. ``retain``: keep the pushed tensors' references to send them again
    when a push fails (not under FSDP, where they are gathered copies).

    Partial rollouts (AReaL's interruptible generation): with ``interrupt``, a weight push
    cuts the engines' generations in flight short; each goes on from its last token on
    the new weights (``keep_partial``) or starts again on them. Without, they finish on
    the weights they started with while the push waits.

    Faults: a request whose engine cannot be reached goes to another engine (counted in
    ``engine_stats["engine_requests_resubmitted"]``) and that engine is marked down; at the next weight
    push an engine this run started (``processes``) that exited is started again and gets
    the weights before it serves (``engine_stats["engine_restarts"]``), and an engine started
    elsewhere that is down is left out of the push (and of the requests); a push that fails
    is tried once more over a new weight group, then raises :class:`EngineError`; with no
    engine up, generation and pushes raise :class:`EngineError`."""

    def __init__(self, urls: Sequence[str], api_key: str, model: str, timeout_s: float = 600.0,
                 weight_host: str = "127.0.0.1", max_batch_size: int | None = None, interrupt: bool = False,
                 keep_partial: bool = True, pusher: bool = True, share: Callable[[Any], Any] | None = None,
                 retain: bool = True) -> None:
        import logging

        import httpx

        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
        if not urls:
            raise ValueError("RemoteBackend needs at least one engine URL")
        self.api_key, self.model = api_key, model
        self.timeout_s, self.weight_host, self.max_batch_size = timeout_s, weight_host, max_batch_size
        self.interrupt, self.keep_partial = interrupt, keep_partial
        self.pusher, self.share, self.retain = pusher, share, retain
        self.router = Router([u.rstrip("/") for u in urls])
        self.client = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"},
                                   limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="grpo_lab-engine-call")
        self.weight_pool = ThreadPoolExecutor(max_workers=max(4, len(urls)), thread_name_prefix="grpo_lab-weights")
        self.version: int | None = None  # of the weights pushed last
        self.engine_stats = {"engine_requests_resubmitted": 0, "engine_requests_interrupted": 0,  # since the start
                             "engine_restarts": 0}
        self._group = None
        self._members: list[str] = []  # the engines in the weight group
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return list(self.router.urls)

    # ------------------------------------------------------------------ generation
    def post(self, url: str, path: str, body: dict) -> dict:
        try:
            response = self.client.post(url + path, json=body)
        except Exception as err:  # connection refused, reset, timeout
            raise EngineUnreachable(f"engine {url}: {type(err).__name__}: {err}") from None
        if response.status_code != 200:
            raise EngineError(f"engine {url}{path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def request(self, prompt: Sequence[int], params: SamplingParams) -> dict:
        """One ``/completions`` call for ``prompt`` (ids), on the engine the router picks;
        an engine that cannot be reached is marked down and the call goes to another."""
        body = {"model": self.model, "prompt": list(prompt), "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "logprobs": 1}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        tried: list[str] = []
        while True:
            url = self.router.acquire(prompt, avoid=tried)
            try:
                return self.post(url, "/completions", body)
            except EngineUnreachable as err:
                self.router.mark_down(url)
                tried.append(url)
                if len(tried) == len(self.router.urls):
                    raise EngineError(f"no engine could take the request; the last: {err}") from None
                self.engine_stats["engine_requests_resubmitted"] += 1
            finally:
                self.router.release(url)

    def complete(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        """One completion. A generation that a weight push cut short (``"abort"``) goes on
        from its last token on the new weights (``partial="continue"``: its tokens keep
        their own log-probs, and the completion the oldest version), or starts again
        (``partial="restart"``)."""
        ids: list[int] = []
        logprobs: list[float] = []
        version: int | None = None
        while True:
            left = params.max_tokens - len(ids)
            seed = None if params.seed is None else (params.seed + len(ids)) % 2**63  # a continuation draws anew
            answer = self.request(list(prompt) + ids, replace(params, max_tokens=left, seed=seed))
            choice = answer["choices"][0]
            part_version = answer.get("weight_version")
            ids += list(choice["token_ids"])
            logprobs += list(choice["logprobs"]["token_logprobs"])
            version = part_version if version is None or part_version is None else min(version, part_version)
            if choice["finish_reason"] != "abort":
                return Completion(ids, logprobs, choice["finish_reason"], version=version)
            self.engine_stats["engine_requests_interrupted"] += 1
            if len(ids) >= params.max_tokens:
                return Completion(ids, logprobs, "length", version=version)
            if not self.keep_partial:
                ids, logprobs, version = [], [], None

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """One completion per prompt, the requests sent at once (the engines batch them)."""
        return list(self.pool.map(self.complete, prompts, per_request(params, len(prompts))))

    def stream(self) -> BatchStream:
        return BatchStream(self, self.max_batch_size)

    # ------------------------------------------------------------------ weights
    def connect(self) -> None:
        """A weight group with every engine (a new one replaces the old: after a restart
        or a failed push)."""
        for url in self.router.up():  # an engine that does not answer would hold the group's rendezvous
            try:
                self.client.get(url + "/weights", timeout=min(self.timeout_s, 30.0)).raise_for_status()
            except Exception as err:
                import logging

                logging.getLogger("grpo_lab").warning("engine %s does not answer (%s): left out of the weight push",
                                                      url, err)
                self.router.mark_down(url)
        port, urls = free_port(self.weight_host), self.router.up()
        if not urls:
            raise EngineError(f"no engine is up to take the weights (down: {sorted(self.router.down)})")
        world = len(urls) + 1
        calls = [self.weight_pool.submit(self.post, url, "/weights/connect",
                                         {"host": self.weight_host, "port": port, "rank": rank, "world": world})
                 for rank, url in enumerate(urls, start=1)]
        self._group = weight_group(self.weight_host, port, 0, world, self.timeout_s)
        self._members = urls
        for call in calls:
            call.result()

    def restart_exited(self) -> bool:
        """Start again the engines this run started that exited; whether any was."""
        if self.processes is None:
            return False
        restarted = False
        for index, (old, new) in self.processes.restart_exited().items():
            self.router.replace(old, new)
            self.engine_stats["engine_restarts"] += 1
            restarted = True
        return restarted

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int | None = None,
                     adapter: dict | None = None) -> None:
        """Push the weights (with ``adapter``, a LoRA adapter of that config) to every
        engine; they serve ``version`` after (default: one more than the last push's).
        Under several trainer processes rank 0 pushes, the others take part in gathering
        the tensors and learn how the push went (and where restarted engines listen)."""
        with self._lock:
            version = version if version is not None else (self.version or 0) + 1
            outcome: tuple = ("ok", None)
            if self.pusher:
                try:
                    self._push_with_retry(named_tensors, version, adapter)
                    outcome = ("ok", self.router.urls)
                except EngineError as err:
                    outcome = ("error", str(err))
            else:
                for _ in named_tensors:  # FSDP gathers every tensor on every rank
                    pass
            if self.share is not None:  # every rank's next requests come after the push
                outcome = self.share(outcome)
                if outcome[0] == "ok" and not self.pusher:
                    self.router.set_urls(outcome[1])
            if outcome[0] == "error":
                raise EngineError(outcome[1])
            self.version = version

    def _push_with_retry(self, named_tensors: Iterable[tuple[str, Tensor]], version: int, adapter: dict | None) -> None:
        if self.restart_exited():
            self._group = None
        tensors = list(named_tensors) if self.retain else named_tensors  # kept: a failed push can be sent again
        try:
            self._push(tensors, version, adapter)
        except Exception as err:  # one more try over a new group (an engine restarted, a broken connection)
            if not isinstance(tensors, list):
                raise EngineError(f"the weight push of version {version} failed: {err}") from err
            import logging

            logging.getLogger("grpo_lab").warning("the weight push of version %d failed (%s): trying again",
                                                  version, err)
            self.restart_exited()
            self._group = None
            try:
                self._push(tensors, version, adapter)
            except Exception as again:
                raise EngineError(f"the weight push of version {version} failed twice: {again}") from again

    def _push(self, named_tensors: Iterable[tuple[str, Tensor]], version: int, adapter: dict | None) -> None:
        if self._group is None or set(self._members) != set(self.router.up()):  # an engine went down: a new group
            self.connect()
        calls = [self.weight_pool.submit(self.post, url, "/weights/update",
                                         {"version": version, "interrupt": self.interrupt, "adapter": adapter})
                 for url in self._members]
        send_tensors(self._group, named_tensors)
        answers = [call.result() for call in calls]
        wrong = [a for a in answers if a.get("version") != version]
        if wrong:
            raise EngineError(f"an engine answered the weight push of version {version} with {wrong[0]}")

    def load_adapter(self, tensors: dict[str, Tensor], peft_config, version: int | None = None) -> None:
        """Push a LoRA adapter (its tensors alone) to every engine, which serves its base
        model with it from then on; as :meth:`load_weights` otherwise."""
        self.load_weights(tensors.items(), version, adapter=adapter_config_dict(peft_config))

    def sleep(self) -> None:
        """The engines keep their memory: they run on their own devices."""

    def wake(self) -> None:
        """See :meth:`sleep`."""

    processes: EngineProcesses | None = None  # the engines this run started (stopped by close)

    def close(self) -> None:
        """Stop the engines this run started; close the connections."""
        if self.processes is not None:
            self.processes.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.weight_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
