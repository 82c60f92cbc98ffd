"""Data-parallel SVI on ``torch.distributed``: one model replica per process, data sharded per process, gradients
all-reduced before every optimiser step, rank 0 writes checkpoints and results.

The engine is plain ``torch.distributed`` (gloo on CPU, NCCL on GPU; launched by ``torchrun`` or by
:func:`spawn_cli` / :func:`launch`, which set the same ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
``MASTER_PORT`` environment). Modules are not wrapped in ``DistributedDataParallel``: Pyro's ``PyroOptim`` steps
every parameter a step touched (modules registered with ``pyro.module`` *and* bare ``pyro.param`` s such as an
``AutoNormal``'s or the HMC step sizes), so the reduction is done on exactly that set, the way Pyro's own SVI
collects it (a ``param_only`` trace around ``loss_and_grads``, see ``pyro.infer.SVI.step``): :class:`DistributedObjective`
wraps any Pyro loss, calls its ``loss_and_grads`` on the local shard, then all-reduces the ``.grad`` of every
captured parameter in one flat buffer (sorted by param-store name, so every rank packs the same layout), together
with the loss, the row count, the per-step statistics and the stop flag of the signal handlers.

Reduction rule (what makes a step over W shards equal to one step on the whole global batch):

- ELBO-type objectives (``Trace_ELBO``, ``TraceEnum_ELBO``, ...) are sums over the rows of the data plate, so the
  global gradient is the **sum** of the per-rank gradients;
- :class:`~ppl_vae.infer.refined_guide.HMCObjective` (Peis et al. 2022, §3.5) gives the base guide's parameters ψ
  the ELBO (sum) but the model's parameters θ, the step sizes φ and the inflation s *means* over datapoints and
  chains (``L_HMC``, the acceptance floor, SKSD), so those are **averaged** (weighted by the rows of each rank:
  ``Σ_r n_r g_r / Σ_r n_r``, the mean over the global batch);
- any other loss may say which parameters are mean-type with a ``mean_reduced_params(model, guide, *args, **kwargs)
  -> set of param names`` method.

Equivalently, every rank's loss is rescaled to an estimate of the global batch's objective and the gradients are
averaged (DDP's convention): the averaged gradient of ``W × local ELBO`` is the summed gradient above.

Data (see :meth:`ppl_vae.infer.svi.Trainer.fit`): a table's seeded loader draws the same global batch of
``batch_size`` rows (same permutation, same train-time missingness) on every rank and rank ``r`` keeps its
contiguous share ``rows[r·B/W : (r+1)·B/W]`` (the ``DistributedSampler`` scheme: shared seed, disjoint shards);
a single :class:`~ppl_vae.models.base.Batch` is sharded the same way; a stream of batches (structured UG-VAE
batches) is dealt round-robin, batch ``k`` to rank ``k mod W``, so each group keeps its meaning.

Sources: PyTorch ``torch.distributed`` (collectives, ``init_process_group``, ``torchrun`` environment), Li et al.
2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (VLDB; gradient all-reduce, bucketing
into flat buffers); Pyro's ``examples/svi_horovod.py`` and ``examples/svi_lightning.py`` (data-parallel SVI by
reducing the gradients of the param store).
"""
from __future__ import annotations

import datetime
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pyro
import torch
import torch.distributed as dist
from pyro import poutine

from ppl_vae.errors import PplVaeError

__all__ = ["is_distributed", "rank", "world_size", "backend_for", "init_from_env", "shutdown", "rank_seed",
           "shard_slice", "shard_batches", "broadcast_module", "gather_objects", "barrier", "DistributedObjective",
           "launch", "spawn_cli", "DEFAULT_TIMEOUT"]

#: timeout of every collective (rank 0 evaluates a fold while the others wait in a broadcast)
DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)


# ---------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def backend_for(device: Any) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: Any = "cpu", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Optional[torch.device]:
    """Join the process group described by the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), if ``WORLD_SIZE > 1`` and no group exists yet.

    Args:
        device: ``"cpu"`` (gloo) or ``"cuda"`` / ``"auto"`` with CUDA available (NCCL; this process's GPU becomes
            ``cuda:LOCAL_RANK`` and the current CUDA device).
        timeout: timeout of the collectives.

    Returns:
        the device this rank trains on (``None`` when the environment asks for one process only).

    Raises:
        PplVaeError: CUDA asked for but fewer GPUs than ``LOCAL_RANK + 1``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if dev.type == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local:
            raise PplVaeError(f"process with LOCAL_RANK={local} needs a GPU but torch sees "
                              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(dev), timeout=timeout)
    return dev


def shutdown() -> None:
    """Destroy the process group if one is initialised (safe to call anywhere)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank_: int) -> int:
    """The Pyro/torch seed of rank ``rank_``: ``seed`` on rank 0, an unrelated stream
    (:func:`ppl_vae.data.tables.seed_for` of ``(seed, rank)``) on the others."""
    if rank_ == 0:
        return int(seed)
    from ppl_vae.data.tables import seed_for

    return seed_for(int(seed), int(rank_), 0x5eed) % (2 ** 32)


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if is_distributed():
        dist.barrier()


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable) on every rank, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every replica (in place, so Pyro's param store, which holds
    the same tensors through ``pyro.module``, follows)."""
    if not is_distributed():
        return
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point() or t.is_complex():
            dist.broadcast(t.data, src=src)


# ---------------------------------------------------------------------- data sharding
def shard_slice(n: int, rank_: int, world: int) -> slice:
    """Rows of rank ``rank_`` of a global batch of ``n`` rows: contiguous, sizes differing by at most one
    (``torch.tensor_split`` boundaries).

    Raises: PplVaeError: ``n < world`` (some rank would get no rows)."""
    if n < world:
        raise PplVaeError(f"a global batch of {n} rows cannot be split over {world} processes; use --batch-size "
                          f">= {world}")
    q, r = divmod(n, world)
    start = rank_ * q + min(rank_, r)
    return slice(start, start + q + (1 if rank_ < r else 0))


def shard_batches(batches: Iterator, rank_: int, world: int, *, rows: bool) -> Iterator:
    """This rank's share of a global batch stream: with ``rows=True`` rows :func:`shard_slice` of every batch (a
    table's loader, full-batch training), else whole batches round-robin (batch ``k`` to rank ``k mod world``)."""
    if rows:
        return (b[shard_slice(b.size, rank_, world)] for b in batches)
    return itertools.islice(batches, rank_, None, world)


# ---------------------------------------------------------------------- the objective
def _param_names_of(fn: Callable, args: tuple, kwargs: dict) -> set[str]:
    """Names of the param sites ``fn(*args, **kwargs)`` touches, without moving any RNG stream and without
    recording them in an enclosing trace."""
    from ppl_vae.infer.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    try:
        with torch.no_grad(), poutine.block():
            tr = poutine.trace(fn, param_only=True).get_trace(*args, **kwargs)
    finally:
        set_rng_state(saved)
    return {name for name, site in tr.nodes.items() if site["type"] == "param"}


class DistributedObjective(pyro.infer.ELBO):
    """A Pyro loss that runs ``inner`` on this rank's shard and all-reduces the gradients of every parameter the
    step touched, so that ``pyro.infer.SVI(model, guide, optim, DistributedObjective(loss))`` takes the step one
    process would take on the whole global batch.

    Per step one flat buffer (dtype of the gradients) is all-reduced (``SUM``): the gradients of the ``P`` captured
    parameters (sorted by name; mean-type ones pre-multiplied by the local row count), ``P`` has-gradient flags,
    the loss, the local row count, the stop flag and signal number, and the per-step statistics of ``inner``
    (``last_stats``). Afterwards sum-type gradients are the global sum, mean-type ones the row-weighted mean; a
    parameter no rank produced a gradient for keeps ``.grad = None`` (a frozen module is not moved by Adam).

    The first time a parameter is seen (a lazily built guide, the first step of a stage) its value is broadcast
    from rank 0 and the parameter-name lists of all ranks are compared.

    Args:
        inner: the per-rank Pyro loss (``Trace_ELBO``, ``TraceEnum_ELBO``, ``HMCObjective``...).
        local_stop: zero-argument callable: the signal number this rank received (``None``/0: none); OR-ed over
            ranks into :attr:`stop_signal` so every rank stops at the same step.

    Attributes (after each :meth:`loss_and_grads`):
        last_loss: the global loss (sum of the ranks' losses: the loss of the global batch for an ELBO).
        last_rows: rows in the global batch.
        last_stats: ``inner.last_stats`` averaged over ranks (row-weighted), or ``{}``.
        stop_signal: a signal number if any rank was asked to stop, else ``None``.
        last_bytes: bytes all-reduced in this step (gradients + ``P + 4 + len(stats)`` scalars).
        last_comm_seconds: wall time of the all-reduce (includes waiting for the slowest rank).

    Raises:
        PplVaeError: the ranks' parameter names differ (replicas built differently).
    """

    def __init__(self, inner, local_stop: Optional[Callable[[], Optional[int]]] = None):
        super().__init__(num_particles=1, max_plate_nesting=getattr(inner, "max_plate_nesting", float("inf")))
        self.inner = inner
        self.local_stop = local_stop or (lambda: None)
        self.last_loss, self.last_rows, self.last_stats = float("nan"), 0, {}
        self.stop_signal: Optional[int] = None
        self.last_bytes, self.last_comm_seconds = 0, 0.0
        self._known: Optional[tuple] = None
        self._mean_names: Optional[set] = None

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - not a trace-based estimator
        raise NotImplementedError("DistributedObjective wraps another loss; use loss / loss_and_grads")

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The inner loss summed over ranks (no gradients)."""
        local = float(self.inner.loss(model, guide, *args, **kwargs))
        if not is_distributed():
            return local
        t = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    # -- which parameters are mean-type
    def _mean_reduced(self, model, guide, args, kwargs, names: Sequence[str]) -> set[str]:
        if self._mean_names is not None:
            return self._mean_names
        from ppl_vae.infer.refined_guide import HMCObjective, HMCRefinedGuide

        hook = getattr(self.inner, "mean_reduced_params", None)
        if hook is not None:
            mean = set(hook(model, guide, *args, **kwargs))
        elif isinstance(self.inner, HMCObjective) and isinstance(guide, HMCRefinedGuide):
            psi = _param_names_of(guide.guide, args, kwargs)  # the base guide's parameters follow the ELBO
            mean = {n for n in names if n not in psi}
        else:
            mean = set()
        self._mean_names = mean
        return mean

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Run ``inner.loss_and_grads`` on the local shard, then all-reduce (see the class docstring).

        Returns: :attr:`last_loss` (the global loss)."""
        with poutine.trace(param_only=True) as capture:
            local_loss = self.inner.loss_and_grads(model, guide, *args, **kwargs)
        sites = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()
                 if site["type"] == "param"}
        names = sorted(sites)
        params = [sites[n] for n in names]
        stats = dict(getattr(self.inner, "last_stats", None) or {})
        rows = _rows_of(args)
        signum = int(self.local_stop() or 0)
        if not is_distributed():
            self.last_loss, self.last_rows, self.last_stats = float(local_loss), rows, stats
            self.stop_signal = signum or None
            return self.last_loss
        if self._known != tuple(names):
            self._check_names(names)
            for p in params:  # values of parameters seen for the first time: rank 0's
                dist.broadcast(p.data, src=0)
            self._known = tuple(names)
        mean = self._mean_reduced(model, guide, args, kwargs, names)
        grads = [p.grad for p in params]
        ref = next((g for g in grads if g is not None), params[0] if params else torch.zeros(()))
        dtype = torch.float64 if any(g is not None and g.dtype == torch.float64 for g in grads) else torch.float32
        device = ref.device
        pieces = []
        for n, p, g in zip(names, params, grads):
            if g is None:
                pieces.append(torch.zeros(p.numel(), dtype=dtype, device=device))
            else:
                g = g.detach().reshape(-1).to(dtype)
                pieces.append(g * rows if n in mean else g)
        keys = sorted(stats)
        scalars = [1.0 if g is not None else 0.0 for g in grads]
        scalars += [float(local_loss), float(rows), 1.0 if signum else 0.0, float(signum)]
        scalars += [float(stats[k]) * rows for k in keys]
        buf = torch.cat(pieces + [torch.tensor(scalars, dtype=dtype, device=device)])
        self.last_bytes = buf.numel() * buf.element_size()
        start = time.perf_counter()
        dist.all_reduce(buf)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.last_comm_seconds = time.perf_counter() - start
        tail = buf[sum(p.numel() for p in params):].tolist()
        has, (total_loss, total_rows, stops, signums), stat_sums = tail[:len(params)], tail[len(params):len(params) + 4], \
            tail[len(params) + 4:]
        offset = 0
        for n, p, h in zip(names, params, has):
            k = p.numel()
            if h > 0:
                g = buf[offset:offset + k].view_as(p)
                if n in mean:
                    g = g / total_rows
                p.grad = g.to(p.dtype).clone()
            offset += k
        self.last_loss, self.last_rows = total_loss, int(round(total_rows))
        self.last_stats = {k: v / total_rows for k, v in zip(keys, stat_sums)}
        self.stop_signal = int(round(signums / stops)) if stops > 0 else None
        return self.last_loss

    def _check_names(self, names: list) -> None:
        everyone = gather_objects(names)
        for r, other in enumerate(everyone):
            if other != names:
                only_here, only_there = sorted(set(names) - set(other)), sorted(set(other) - set(names))
                raise PplVaeError(f"data-parallel replicas differ: rank {dist.get_rank()} has parameters "
                                  f"{only_here[:5]} that rank {r} lacks, rank {r} has {only_there[:5]}"
                                  if only_here or only_there else
                                  f"data-parallel replicas differ in parameter order (rank {r})")


def _rows_of(args: tuple) -> int:
    """Rows of the first argument when it is a Batch (or has a leading batch axis), else 1."""
    if args:
        a = args[0]
        size = getattr(a, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    return 1


# ---------------------------------------------------------------------- launchers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_entry(local_rank: int, fn: Callable, nprocs: int, init_file: str, result_dir: str, backend: str,
                  threads: Optional[int], args: tuple) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nprocs)})
    if threads:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=local_rank, world_size=nprocs,
                            timeout=DEFAULT_TIMEOUT)
    try:
        result = fn(local_rank, nprocs, *args)
        with open(os.path.join(result_dir, f"rank{local_rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
    finally:
        shutdown()


def launch(fn: Callable, nprocs: int, *args: Any, backend: str = "gloo", start_method: str = "fork",
           threads: Optional[int] = 1, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh processes that have joined one process group
    (``backend``; rendezvous through a temporary file, so no port is needed) and return their results in rank
    order (each pickled through a temporary file).

    ``start_method="fork"`` starts in milliseconds (tests, benchmarks; the parent must not have initialised a
    process group or CUDA); ``"spawn"`` re-imports everything and needs a picklable, importable ``fn``.

    Raises:
        torch.multiprocessing.ProcessRaisedException / ProcessExitedException: a rank failed (the others are
            terminated; the child's traceback is in the message).
        TimeoutError: not finished after ``timeout`` seconds (all ranks are killed).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ppl_vae_launch_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_launch_entry, args=(fn, nprocs, init_file, tmp, backend, threads, args),
                                 nprocs=nprocs, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{nprocs} data-parallel processes did not finish within {timeout:g} s")
        out = []
        for r in range(nprocs):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as fh:
                out.append(pickle.load(fh))
        return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    os.setsid()  # Ctrl-C reaches the launcher only; it forwards one signal per keypress
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the launcher dies
    except (OSError, AttributeError):
        pass


def spawn_cli(argv: Sequence[str], nprocs: int, *, grace: float = 30.0) -> int:
    """The ``--num-processes N`` launcher: run ``python -m ppl_vae.cli ARGV`` in ``nprocs`` processes with the
    ``torchrun`` environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``), wait for them and return rank 0's exit status (or the first failing rank's).

    SIGINT / SIGTERM to the launcher are forwarded to every rank (they stop at the same step and rank 0 writes the
    checkpoint); a second Ctrl-C stops them at once. When a rank fails with a status other than 0 / 130 / 143 the
    others are terminated after ``grace`` seconds (they would wait for it in the next all-reduce).
    """
    env = dict(os.environ)
    env.update({"WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()), "PPL_VAE_LAUNCHER": "1"})
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = []
    for r in range(nprocs):
        child_env = dict(env, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, "-m", "ppl_vae.cli", *argv], env=child_env,
                                      preexec_fn=_die_with_parent if os.name == "posix" else None))

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread
            pass
    try:
        failed_at: Optional[float] = None
        codes: list = [None] * nprocs
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                codes[i] = p.poll()
            bad = [c for c in codes if c not in (None, 0, 130, 143)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        if all(c in (0, 130, 143) for c in codes):
            return codes[0]
        failures = [c for c in codes if c not in (0, 130, 143) and c > 0]   # negative: killed by us
        return codes[0] if codes[0] not in (0, 130, 143) and codes[0] > 0 else (failures[0] if failures else 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
