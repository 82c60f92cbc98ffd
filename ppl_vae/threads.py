"""Thread policy for small-tensor work (SVI on tables, HMC on a few latent dimensions, posterior sampling).

The networks here are tiny (tens of units, batches of ~128 rows): one torch operation costs microseconds, far less
than waking and synchronising an intra-op thread pool. On a machine whose cores are busy with other processes, every
parallel region then waits for a descheduled worker: measured on a loaded 2-core machine (issue 12), training on
``airquality`` took 134.5 s with torch's default thread count and 12.3 s with one thread, and a 2-D ``HMCSampler``
fit ran at 1.2 instead of ~100 steps/s. ``benchmarks/threads.py`` re-measures it (``benchmarks/results/threads.md``).

Policy (:func:`default_threads`): **one intra-op thread** for the package's own entry points on CPU, unless the
environment variable ``PPL_VAE_THREADS`` says otherwise (a positive integer, or ``"torch"`` to leave torch's setting
alone). Override per call with ``threads=`` where an entry point takes it, per command with ``--threads N``, or
globally with :func:`set_threads`.

Nothing happens on import: :func:`small_work_threads` sets the thread count only while the work runs and restores
the caller's setting afterwards; :func:`set_threads` is the explicit, global alternative.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, Optional, TypeVar, Union

import torch

__all__ = ["default_threads", "small_work_threads", "set_threads", "small_work", "ENV_VAR"]

#: environment variable holding the default (a positive integer, or ``"torch"`` for torch's own setting)
ENV_VAR = "PPL_VAE_THREADS"

_F = TypeVar("_F", bound=Callable)
_override: Optional[int] = None


def default_threads() -> Optional[int]:
    """The thread count the package uses for small-tensor CPU work: the value given to :func:`set_threads` if any,
    else ``PPL_VAE_THREADS`` (``None`` when it is ``"torch"``: leave torch alone), else 1.

    Raises:
        ValueError: ``PPL_VAE_THREADS`` is neither a positive integer nor ``"torch"``.
    """
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return 1
    if env.lower() == "torch":
        return None
    try:
        n = int(env)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV_VAR}={env!r}: give a positive integer or 'torch'")
    return n


def set_threads(n: Union[int, str, None]) -> None:
    """Set the package-wide default used by :func:`small_work_threads` (and so by ``ppl_vae.impute``/``predict``,
    the pipeline and every CLI command): a positive integer, ``"torch"`` (leave torch's setting alone) or ``None``
    (back to the ``PPL_VAE_THREADS`` / 1 policy). Does not call ``torch.set_num_threads`` itself.

    Raises:
        ValueError: ``n`` is not a positive integer, ``"torch"`` or ``None``.
    """
    global _override
    if n is None:
        _override = None
        return
    if isinstance(n, str) and n.lower() == "torch":
        _override = None
        os.environ[ENV_VAR] = "torch"
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be a positive integer, 'torch' or None, got {n!r}")
    _override = int(n)


@contextlib.contextmanager
def small_work_threads(threads: Union[int, str, None] = None) -> Iterator[int]:
    """Run the enclosed block with ``threads`` intra-op torch threads (default :func:`default_threads`), restoring
    the previous count afterwards (also on error). ``"torch"`` (or a policy of ``None``) changes nothing.

    Yields:
        the thread count in force inside the block.

    Raises:
        ValueError: ``threads`` is not a positive integer, ``"torch"`` or ``None``.
    """
    if isinstance(threads, str):
        if threads.lower() != "torch":
            raise ValueError(f"threads must be a positive integer or 'torch', got {threads!r}")
        n = None
    elif threads is None:
        n = default_threads()
    else:
        if isinstance(threads, bool) or int(threads) < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        n = int(threads)
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield previous
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def small_work(fn: _F) -> _F:
    """Decorator: run ``fn`` inside :func:`small_work_threads` (its ``threads=`` keyword, if passed, is consumed
    and used as the count)."""
    @functools.wraps(fn)
    def wrapper(*args, threads: Union[int, str, None] = None, **kwargs):
        with small_work_threads(threads):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
