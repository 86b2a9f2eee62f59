#!/usr/bin/env python3
"""Pairs per hour of a cohort batch with 1 worker vs N local workers, in one run.

    .venv/bin/python bench/bench_cohort.py [--pairs 6] [--workers 1 2] [--paradigm iterative]
        [--param NAME=VALUE ...] [--out bench/results/cohort_speedup.json]

Runs ``app.engine.cohort.run_batch`` (the code behind ``main.py evaluate --workers N``) on the first
``--pairs`` IXI test pairs of the project's split, with each worker count in turn, default
parameters unless ``--param`` says otherwise. Workers = 1 runs in this process with every core's
threads (SimpleITK's default); workers = N runs N processes with cores // N threads each. The wall
time of each batch includes starting the worker processes. Reported: wall seconds, pairs/hour,
speedup over the first configuration, mean Dice (the tables must agree), the load average before
and after each batch, and the CPU seconds other processes took from the machine meanwhile
(``/proc/stat`` busy time minus this benchmark's own): on a shared machine that number says how far
to trust the speedup. On a busy machine every configuration gets about the same share of the CPU
whatever its parallelism, so the measured speedup tends to 1; ``model_speedup_alone`` is then the
better guide: from each configuration's CPU seconds per pair and its mean number of runnable
threads (sampled from /proc), the throughput it would have on the machine alone -- a model, not a
measurement, and reported as such.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine.cohort import available_cores, run_batch  # noqa: E402
from app.engine.datasets import ixi_paths, load_split  # noqa: E402
from app.engine.io import read_pairs_csv  # noqa: E402
from app.engine.paradigms import parse_param_args  # noqa: E402


def write_pairs_csv(path: Path, n: int) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks"])
        for f, m in load_split()["test_pairs"][:n]:
            (fi, fl), (mi, ml) = ixi_paths(f), ixi_paths(m)
            w.writerow([fi, mi, fl, ml, "", ""])
    return path


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; /proc/stat)."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class RunnableThreads(threading.Thread):
    """Samples how many threads of this process and its children are runnable (state R), every 0.2 s.

    The mean is how many cores the batch could use on a machine of its own: a serial stretch has
    one runnable thread, a parallel one has several. Other processes slow every runnable thread
    alike, so the mean survives a shared machine far better than wall times do (a thread that waits
    at a barrier for a descheduled sibling lowers it a little).
    """

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.samples, self._stop_event = period, [], threading.Event()
        self.root = os.getpid()

    def _pids(self) -> list[int]:
        pids, frontier = [self.root], [self.root]
        while frontier:
            kids = []
            for pid in frontier:
                for task in Path(f"/proc/{pid}/task").glob("*/children"):
                    try:
                        kids += [int(x) for x in task.read_text().split()]
                    except OSError:
                        pass
            pids += kids
            frontier = kids
        return pids

    def run(self) -> None:
        me = threading.get_native_id()
        while not self._stop_event.wait(self.period):
            n = 0
            for pid in self._pids():
                for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
                    try:
                        if int(stat.parent.name) != me and stat.read_text().rsplit(")", 1)[1].split()[0] == "R":
                            n += 1
                    except (OSError, IndexError, ValueError):
                        pass
            self.samples.append(n)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return sum(self.samples) / max(1, len(self.samples))


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (pool workers are joined at the end)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paradigm", default="iterative")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the worker counts R times, in ABBA order (1 2 2 1 ...) so that a load that drifts "
                         "during the run weighs on every configuration alike")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cohort_speedup.json"))
    a = ap.parse_args()
    params = parse_param_args(a.param) or None
    tmp = Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    pairs = read_pairs_csv(write_pairs_csv(tmp / "pairs.csv", a.pairs))
    runs = []
    order = [w for r in range(a.repeat) for w in (a.workers if r % 2 == 0 else a.workers[::-1])]
    for rep, n in enumerate(order):
        load0, busy0, own0 = os.getloadavg(), cpu_busy_s(), own_cpu_s()
        sampler = RunnableThreads()
        sampler.start()
        t0 = time.perf_counter()
        rows, summary = run_batch(pairs, a.paradigm, params, workers=n, out_dir=tmp / f"run{rep}_w{n}", device="cpu")
        wall = time.perf_counter() - t0
        runnable = sampler.stop()
        busy, own = cpu_busy_s() - busy0, own_cpu_s() - own0
        run = {"workers": n, "threads_per_worker": available_cores() // n if n > 1 else available_cores(),
               "pairs": len(rows), "failed": summary["failed"], "wall_s": round(wall, 2),
               "pairs_per_hour": round(3600.0 * len(rows) / wall, 1),
               "mean_runtime_s_per_pair": summary["runtime_s"], "dice_mean": summary["dice_mean"],
               "loadavg_before": [round(x, 2) for x in load0],
               "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "cpu_s_this_benchmark": round(own, 1), "cpu_s_other_processes": round(max(0.0, busy - own), 1),
               "cpu_s_available": round(wall * available_cores(), 1),
               "share_of_machine": round(own / (wall * available_cores()), 3),
               "mean_runnable_threads": round(runnable, 2)}
        runs.append(run)
        print(json.dumps(run), flush=True)
    # throughput of a configuration = its pairs over its summed wall time (over the repeats)
    per = {}
    for r in runs:
        d = per.setdefault(r["workers"], {"pairs": 0, "wall_s": 0.0, "cpu_s_this_benchmark": 0.0,
                                          "cpu_s_other_processes": 0.0, "runnable_x_wall": 0.0})
        for k in ("pairs", "wall_s", "cpu_s_this_benchmark", "cpu_s_other_processes"):
            d[k] += r[k]
        d["runnable_x_wall"] += r["mean_runnable_threads"] * r["wall_s"]
    for d in per.values():
        d["pairs_per_hour"] = round(3600.0 * d["pairs"] / d["wall_s"], 1)
        d["cpu_s_per_pair"] = round(d["cpu_s_this_benchmark"] / d["pairs"], 1)
        d["other_processes_cpu_fraction"] = round(d["cpu_s_other_processes"] / (d["wall_s"] * available_cores()), 3)
        d["mean_runnable_threads"] = round(d.pop("runnable_x_wall") / d["wall_s"], 2)
        # on a machine of its own a configuration runs min(runnable, cores) cores' worth of its CPU work
        d["model_pairs_per_hour_alone"] = round(
            3600.0 * min(d["mean_runnable_threads"], available_cores()) / d["cpu_s_per_pair"], 1)
    base = per[a.workers[0]]["pairs_per_hour"]
    quiet = all(r["loadavg_before"][0] < available_cores() + 0.5 and
                r["cpu_s_other_processes"] < 0.1 * r["cpu_s_available"] for r in runs)
    result = {"what": f"{a.paradigm} ({'default parameters' if not params else params}) on the first "
                      f"{a.pairs} IXI test pairs, evaluate mode (Dice + HD95 per pair), "
                      f"run_batch with each worker count in turn, {a.repeat} round(s) in ABBA order, one invocation",
              "command": ".venv/bin/python bench/bench_cohort.py " + " ".join(sys.argv[1:]),
              "cores": available_cores(), "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "runs": runs, "per_workers": per,
              "speedup": {f"{n} vs {a.workers[0]}": round(per[n]["pairs_per_hour"] / base, 3) for n in a.workers[1:]},
              "model_speedup_alone": {f"{n} vs {a.workers[0]}": round(
                  per[n]["model_pairs_per_hour_alone"] / per[a.workers[0]]["model_pairs_per_hour_alone"], 3)
                  for n in a.workers[1:]},
              "machine_quiet": quiet,
              "note": ("load average below the core count and other processes under 10 % of the CPU in every run"
                       if quiet else "the machine was shared: other processes took CPU during the runs "
                       "(cpu_s_other_processes); the speedup is only as good as the load was even")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["speedup"]), "->", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
