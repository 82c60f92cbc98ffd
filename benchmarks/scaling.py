"""Data-parallel throughput (issue 13): steps/s and rows/s of :class:`ppl_vae.infer.Trainer` with 1 vs N processes
at the same global batch, the communication per step (bytes all-reduced, time in the all-reduce, and a pure
all-reduce of the same buffer), and a written projection for 8 GPUs from those measurements.

    python benchmarks/scaling.py                                  # vae + hmc-vae on naval, 1 vs 2 CPU processes
    python benchmarks/scaling.py --device cuda --processes 1      # one GPU: the compute time the projection needs
    python benchmarks/scaling.py --smoke --out /tmp/scaling.md    # seconds: used by the tests

Every process uses ``--threads`` torch threads (default 1). On a 2-core machine two processes can at best double
the throughput of one single-threaded process, and only when nothing else runs: the load average at measurement
time is written beside the numbers.

Projection model (stated, not measured here): a data-parallel step on W devices takes
``t(W) = t_compute(B / W) + t_allreduce(W)`` with the ring all-reduce of NCCL,
``t_allreduce(W) ≈ 2 (W - 1) α + 2 (W - 1) / W · bytes / β`` (Patarasuk & Yuan 2009; NCCL docs, "ring" algorithm),
``α`` the per-hop latency and ``β`` the per-link bandwidth; the figures used for ``α``/``β`` are printed with the
projection and are assumptions about an 8-GPU NVLink node, to be replaced by a measurement.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ppl_vae.infer import distributed as D  # noqa: E402

#: assumptions of the 8-GPU projection (an NVLink/NVSwitch node; NCCL small-message latency and bus bandwidth)
ALPHA_S = 5e-6          # per-hop latency of one ring step
BETA_BPS = 150e9        # per-link bandwidth in bytes/s


def _model_kwargs(name: str, smoke: bool) -> dict:
    kw = {"latent_dim": 2, "hidden": [8]} if smoke else {"latent_dim": 10, "hidden": [64, 64]}
    if name.startswith("hmc"):
        kw.update({"hmc_steps": 2, "leapfrog_steps": 2, "sksd_chains": 4} if smoke else {"hmc_fraction": 0.5})
    return kw


def _train(rank: int, world: int, name: str, dataset: str, steps: int, batch: int, device: str, threads: int,
           smoke: bool) -> dict:
    """One rank of a timed training run; returns timings and the communication of the run."""
    import pyro

    from ppl_vae.data import load_dataset
    from ppl_vae.infer.svi import Trainer
    from ppl_vae.models import build_model

    torch.set_num_threads(threads)
    pyro.clear_param_store()
    ds = load_dataset(dataset)
    split = ds.splits(n_splits=10, seed=0)[0]
    warm = build_model(name, ds.schema, **_model_kwargs(name, smoke))   # first-call costs, not timed
    Trainer(warm, seed=0, batch_size=batch, progress=False, device=device).fit(split.train, 2)
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = build_model(name, ds.schema, **_model_kwargs(name, smoke))
    trainer = Trainer(model, seed=0, batch_size=batch, lr=1e-3, progress=False, device=device)
    D.barrier()
    start = time.perf_counter()
    history = trainer.fit(split.train, steps)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    comm = trainer.comm_stats
    out = {"seconds": seconds, "steps": len(history), "final_loss": sum(h["loss"] for h in history[-max(1, len(history) // 10):]) / max(1, len(history) // 10),
           "bytes_per_step": comm["bytes_per_step"], "comm_s_per_step": comm["seconds"] / max(comm["steps"], 1),
           "params": sum(p.numel() for p in model.parameters())}
    if world > 1:  # the same buffer all-reduced alone, many times: communication without compute or waiting
        numel = max(1, comm["bytes_per_step"] // 4)
        buf = torch.zeros(numel, device=device)
        for _ in range(5):
            torch.distributed.all_reduce(buf)
        reps = 50 if smoke else 500
        D.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.distributed.all_reduce(buf)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out["pure_allreduce_s"] = (time.perf_counter() - t0) / reps
    return out


def measure(name: str, dataset: str, processes: int, steps: int, batch: int, device: str, threads: int,
            smoke: bool) -> dict:
    """Train ``name`` for ``steps`` steps at global batch ``batch`` on ``processes`` processes; returns rank 0's
    numbers plus ``steps_per_s`` and ``rows_per_s`` (global rows)."""
    if processes == 1:
        r = _train(0, 1, name, dataset, steps, batch, device, threads, smoke)
    else:
        r = D.launch(_train, processes, name, dataset, steps, batch, device, threads, smoke,
                     backend=D.backend_for(device), start_method="spawn" if device.startswith("cuda") else "fork",
                     threads=threads, timeout=3600)[0]
    r.update({"model": name, "processes": processes, "batch": batch, "steps_per_s": r["steps"] / r["seconds"],
              "rows_per_s": r["steps"] * batch / r["seconds"]})
    return r


def project(rows: list[dict], gpus: int = 8) -> list[str]:
    """Lines of the 8-GPU projection from the measured single-process compute time and all-reduce size."""
    lines = []
    for r1 in (r for r in rows if r["processes"] == 1):
        dp = [r for r in rows if r["model"] == r1["model"] and r["processes"] > 1]
        nbytes = dp[0]["bytes_per_step"] if dp else None
        if not nbytes:
            continue
        t1 = r1["seconds"] / r1["steps"]
        ar = 2 * (gpus - 1) * ALPHA_S + 2 * (gpus - 1) / gpus * nbytes / BETA_BPS
        # weak scaling: each GPU keeps the measured per-process batch, the global batch grows W-fold
        t_weak = t1 + ar
        lines.append(
            f"- `{r1['model']}`: {nbytes / 1024:.1f} KiB all-reduced per step; ring all-reduce on {gpus} GPUs ≈ "
            f"{ar * 1e6:.0f} µs (α = {ALPHA_S * 1e6:g} µs, β = {BETA_BPS / 1e9:g} GB/s, assumed). With the measured "
            f"per-step compute of one {r1['device']} process at batch {r1['batch']} ({t1 * 1e3:.2f} ms), "
            f"{gpus} replicas at batch {r1['batch']} each (global {gpus * r1['batch']}) would run "
            f"{1 / t_weak:.0f} steps/s = {gpus * r1['batch'] / t_weak:,.0f} rows/s "
            f"({gpus * t1 / t_weak:.2f}× the rows/s of one device; communication {ar / t_weak:.1%} of a step).")
    return lines


def write_report(rows: list[dict], path: Path, args, load: tuple) -> str:
    head = ("| model | device | processes | global batch | steps/s | rows/s | speed-up (rows/s) | all-reduce KiB/step "
            "| all-reduce ms/step (in training) | pure all-reduce ms | loss (mean of the last 10% of steps) |")
    lines = [f"# Data-parallel scaling ({'smoke' if args.smoke else 'measured'})", "",
             f"`python benchmarks/scaling.py {' '.join(args.argv)}` — data set `{args.dataset}`, {args.steps} steps, "
             f"{args.threads} torch thread(s) per process, {os.cpu_count()} CPU cores, load average before the runs "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min).", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    base = {r["model"]: r["rows_per_s"] for r in rows if r["processes"] == 1}
    for r in rows:
        speed = r["rows_per_s"] / base[r["model"]] if r["model"] in base else float("nan")
        lines.append(
            f"| {r['model']} | {r['device']} | {r['processes']} | {r['batch']} | {r['steps_per_s']:.1f} | "
            f"{r['rows_per_s']:,.0f} | {speed:.2f}× | {r['bytes_per_step'] / 1024:.1f} | "
            f"{1e3 * r['comm_s_per_step']:.2f} | "
            f"{1e3 * r.get('pure_allreduce_s', 0.0):.3f} | {r['final_loss']:.3f} |")
    lines += ["", "## Projection for 8 GPUs (on paper)", ""] + (project(rows) or ["- (needs a 1- and a multi-process row)"])
    lines += ["", "The all-reduce size is the gradient of every parameter the step touched (float32) plus one flag per "
              "parameter and a few scalars (loss, rows, stop flag, statistics); it does not depend on the batch. "
              "The compute per step of these small MLPs on a GPU is bound by kernel launches rather than by rows, "
              "so on one GPU a larger batch raises rows/s almost for free; data parallelism pays once one device's "
              "batch is compute-bound (large tables, image models)."]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vae", "hmc-vae"])
    p.add_argument("--dataset", default="naval")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256, help="global batch (split over the processes)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.md"))
    p.add_argument("--smoke", action="store_true", help="tiny models, a few steps, yacht (seconds)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.models, args.dataset, args.steps, args.batch_size = ["vae"], "yacht", 6, 32
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    rows = []
    for name in args.models:
        for n in args.processes:
            r = measure(name, args.dataset, n, args.steps, args.batch_size, args.device, args.threads, args.smoke)
            r["device"] = args.device
            rows.append(r)
            print(f"{name} x{n}: {r['steps_per_s']:.1f} steps/s, {r['rows_per_s']:,.0f} rows/s, "
                  f"{r['bytes_per_step']} B all-reduced/step", flush=True)
    print(write_report(rows, Path(args.out), args, load))
    return rows


if __name__ == "__main__":
    main()
