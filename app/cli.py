"""Command-line interface: argument parsing -> the same engine functions the GUI calls.

    main.py register FIXED MOVING --paradigm KEY --out DIR [options]
    main.py register --pairs PAIRS.csv --paradigm KEY --out DIR [batch options]
    main.py evaluate --pairs PAIRS.csv --paradigm KEY --out DIR [batch options]
    main.py train --paradigm KEY --out FILE [--steps N] [--param NAME=VALUE ...]
    main.py info FILE
    main.py convert INPUT OUTPUT [--dtype TYPE]

Batch options: ``--workers N`` (local processes), ``--dask-scheduler ADDRESS|local:N``, ``--threads N``
(per running pair), ``--resume``, ``--pair-timeout S`` (a pair running past S seconds becomes a failed row).

Errors print one line (``error: ...``) on stderr and exit with status 1 (2 for usage errors);
Ctrl+C cancels cleanly (status 130) without leaving partial files. A batch whose every pair ran
but some failed exits with status 3 (the failed pairs are rows with an ``error`` message).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path


class _Bar:
    """A tqdm progress bar fed by engine Progress callbacks (fraction 0..1, or iterations)."""

    def __init__(self, desc: str, enabled: bool = True):
        from tqdm import tqdm
        self._bar = tqdm(total=1000, desc=desc, unit="", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}",
                         disable=not enabled, file=sys.stderr, dynamic_ncols=True)
        self._last = 0

    def __call__(self, p) -> None:
        if p.fraction is not None:
            n = int(max(0.0, min(1.0, p.fraction)) * 1000)
            if n > self._last:
                self._bar.update(n - self._last)
                self._last = n
        post = f"{p.stage} it {p.iteration}"
        if p.loss == p.loss:  # not NaN
            post += f" loss {p.loss:.4g}"
        self._bar.set_postfix_str(post, refresh=False)

    def close(self):
        self._bar.close()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paradigm", required=True,
                   help="paradigm key (see `main.py info --paradigms`), or a pipeline A+B+C: each stage starts from "
                        "the previous one's transform (--param B.name=value sets a stage's parameter)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help="model checkpoint for learned paradigms (default: the bundled one)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="paradigm parameter; STAGE.NAME=VALUE for one stage of a pipeline (its key or position)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics", default="regstation", choices=("regstation", "learn2reg"),
                   help="HD95 and SDlogJ definitions: regstation (HD95 over surface voxels as MONAI, std log J) "
                        "or learn2reg (area-weighted surfel HD95 of the surface-distance package, std log(J+3))")


def _add_error_map(p: argparse.ArgumentParser) -> None:
    p.add_argument("--error-map", nargs="?", const="dissimilarity", choices=("consistency", "dissimilarity", "tta"),
                   help="also write DIR/error_map.nii.gz: the estimated registration error (mm) per fixed voxel "
                        "(consistency: register the reverse direction too; dissimilarity: local 1 - LNCC after "
                        "warping, seconds; tta: spread over perturbed restarts)")


def _add_guide_method(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guide-method", choices=("optimise", "rbf"), default="optimise",
                   help="how guide pairs correct the result (register: --guide-*-landmarks; evaluate / --pairs: "
                        "the CSV's guide_fixed_landmarks,guide_moving_landmarks columns): optimise (default; "
                        "image-aware: local NCC + smoothness + the guides as a landmark term from the result, "
                        "tapered around the guides, then an RBF snap of the residual; tens of seconds on a CPU) "
                        "or rbf (a Gaussian-RBF field on top, seconds, blind to the images: it lowered Dice on "
                        "IXI pairs, bench/results/guidance.md)")


BATCH_FAILED = 3  # exit status: the batch ran, some pairs failed (rows with an error message)


def _add_batch(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batch (PAIRS.csv)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="register N pairs at a time in N local processes (threads per process: cores // N)")
    g.add_argument("--dask-scheduler", metavar="ADDRESS",
                   help="run the pairs on a Dask distributed cluster (tcp://host:8786), or on a local one "
                        "of N workers (local:N); file paths must be visible to every worker")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per running pair (default: cores // workers; 1 per Dask task)")
    g.add_argument("--resume", action="store_true",
                   help="skip pairs already finished in --out (same paradigm, parameters and inputs)")
    g.add_argument("--pair-timeout", type=float, default=0.0, metavar="S",
                   help="stop a pair that runs past S seconds and report it as failed (timed out); the batch "
                        "goes on (default 0: no limit)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="main.py", description="RegStation: medical image registration")
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register one pair (FIXED MOVING), or every pair of a PAIRS.csv")
    r.add_argument("fixed", nargs="?")
    r.add_argument("moving", nargs="?")
    r.add_argument("--pairs", help="CSV: fixed,moving[,fixed_labels,...]: register every pair into OUT/pairs/<id>/")
    _add_common(r)
    for opt in ("--fixed-labels", "--moving-labels", "--fixed-landmarks", "--moving-landmarks"):
        r.add_argument(opt)
    r.add_argument("--guide-fixed-landmarks", metavar="F",
                   help="guide points (fixed) the result must honour: a smooth local correction moves each onto "
                        "its partner in --guide-moving-landmarks (kept apart from the evaluation landmarks)")
    r.add_argument("--guide-moving-landmarks", metavar="M", help="guide points (moving), matched to F by order")
    _add_guide_method(r)
    _add_error_map(r)
    _add_batch(r)

    e = sub.add_parser("evaluate", help="register every pair of a PAIRS.csv and tabulate metrics")
    e.add_argument("--pairs", required=True, help="CSV: fixed,moving,fixed_labels,moving_labels,fixed_landmarks,moving_landmarks")
    _add_common(e)
    _add_error_map(e)
    _add_guide_method(e)
    _add_batch(e)

    t = sub.add_parser("train", help="train a learned paradigm")
    t.add_argument("--paradigm", help="learned paradigm to train (see --list-options)")
    t.add_argument("--out", help="checkpoint file to write")
    t.add_argument("--steps", type=int)
    t.add_argument("--resume", help="checkpoint to resume from")
    t.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="training option (see --list-options)")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--list-options", action="store_true", help="list the training options (--param NAME=VALUE) and exit")

    i = sub.add_parser("info", help="describe an image, label map, transform or landmark file; or list paradigms")
    i.add_argument("file", nargs="?")
    i.add_argument("--paradigms", action="store_true", help="list paradigms and their parameters")

    c = sub.add_parser("convert", help="convert an image between formats (NIfTI, NRRD, MHA, DICOM folder in)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--dtype", choices=("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"),
                   help="output pixel type (default: keep the input's; integer types round and refuse overflow)")
    return ap


def _cmd_register(a) -> int:
    if a.pairs:
        return _run_batch(a, "register")
    from .engine import io
    from .engine.evaluation import register_and_measure, write_registration
    from .engine.paradigms import parse_param_args
    params = parse_param_args(a.param)
    fixed = io.read_volume(a.fixed)
    moving = io.read_volume(a.moving)
    fl = io.read_labels(a.fixed_labels, reference=fixed) if a.fixed_labels else None
    ml = io.read_labels(a.moving_labels) if a.moving_labels else None
    if a.fixed_landmarks and a.moving_landmarks:   # read together: undefined points drop their pair
        fp, mp = io.read_landmark_pair(a.fixed_landmarks, a.moving_landmarks)
    else:
        fp = io.read_landmarks(a.fixed_landmarks) if a.fixed_landmarks else None
        mp = io.read_landmarks(a.moving_landmarks) if a.moving_landmarks else None
    if a.guide_fixed_landmarks and a.guide_moving_landmarks:
        gf, gm = io.read_landmark_pair(a.guide_fixed_landmarks, a.guide_moving_landmarks)
    else:
        gf = io.read_landmarks(a.guide_fixed_landmarks) if a.guide_fixed_landmarks else None
        gm = io.read_landmarks(a.guide_moving_landmarks) if a.guide_moving_landmarks else None
    bar = _Bar(f"register [{a.paradigm}]", not a.no_progress)
    try:
        result, m = register_and_measure(a.paradigm, fixed, moving, params, fixed_labels=fl, moving_labels=ml,
                                         fixed_points=fp, moving_points=mp, checkpoint=a.checkpoint,
                                         device=a.device, progress=bar, cancel=_cancel_event(),
                                         error_map=a.error_map, guide_fixed_points=gf, guide_moving_points=gm,
                                         guide_method=a.guide_method, metric_style=a.metrics)
    finally:
        bar.close()
    write_registration(a.out, result, m)
    _print_summary(m)
    _print_checks(m)
    return 0


def _print_summary(m: dict) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    b = m.get("before", {})
    print(f"Dice {f(b.get('dice_mean'), '.4f')} -> {f(m.get('dice_mean'), '.4f')} | "
          f"HD95 {f(b.get('hd95_mean'), '.2f')} -> {f(m.get('hd95_mean'), '.2f')} mm | "
          f"TRE {f(b.get('tre_mean_mm'), '.2f')} -> {f(m.get('tre_mean_mm'), '.2f')} mm | "
          f"fold {f(None if m.get('fold_fraction') is None else 100 * m['fold_fraction'], '.3f')} % | "
          f"SDlogJ {f(m.get('sdlogj'), '.3f')} | {f(m.get('runtime_s'), '.1f')} s on {m.get('device')}")


def _print_checks(m: dict) -> None:
    """The result's self-checks: every stage check's values and kept stage, then the warnings."""
    checks = m.get("checks") or {}
    per = {"": checks} if "stage_check" in checks else {f"stage {k}: ": v for k, v in checks.items()}
    for prefix, c in per.items():
        sc = (c or {}).get("stage_check") if isinstance(c, dict) else None
        if sc:
            ov = sc.get("overlap") or {}
            vals = " -> ".join(f"{k} {v:.3f}" + (f"/{ov[k]:.3f}" if k in ov else "") for k, v in sc["values"].items())
            what = sc["metric"] + (" / foreground overlap" if ov else "")
            print(f"{prefix}stage check ({what} on the fixed grid): {vals}; kept {sc['kept']}"
                  + (" (WORSE than its input: not the full result)" if sc.get("flagged") else ""))
    if m.get("flagged"):
        print("RESULT FLAGGED: a learned stage made the pair less similar than its input; "
              "the better stage's transform was kept (see the warnings and metrics.json 'checks')")
    for w in m.get("warnings") or []:
        print(f"WARNING: {w}")


_CANCEL = threading.Event()


def _cancel_event() -> threading.Event:
    return _CANCEL


def _cmd_evaluate(a) -> int:
    return _run_batch(a, "evaluate")


def _run_batch(a, mode: str) -> int:
    """``evaluate`` / ``register --pairs``: every pair of a manifest, failures as rows (status 3)."""
    from .engine import io
    from .engine.cohort import run_batch
    from .engine.paradigms import parse_param_args
    from .engine.types import Cancelled
    pairs = io.read_pairs_csv(a.pairs)
    if not pairs:
        raise ValueError(f"{a.pairs} lists no pairs")
    if a.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {a.workers}")
    if not a.pair_timeout >= 0:
        raise ValueError(f"--pair-timeout must be >= 0 seconds, got {a.pair_timeout}")
    from tqdm import tqdm
    where = f"dask {a.dask_scheduler}" if a.dask_scheduler else f"{a.workers} worker{'s' * (a.workers > 1)}"
    bar = tqdm(total=len(pairs), desc=f"{mode} [{a.paradigm}, {where}]", unit="pair", file=sys.stderr,
               disable=a.no_progress, dynamic_ncols=True)

    def on_result(rec, counts):
        bar.update(1)
        dice = rec["row"].get("dice_mean")
        last = "error" if rec["error"] else ("-" if dice is None else f"{dice:.3f}")
        bar.set_postfix_str(f"failed {counts['failed']}, resumed {counts['resumed']}, last Dice {last}")

    measure = {"metric_style": a.metrics}
    if getattr(a, "error_map", None):  # register --pairs --error-map: one error map per pair
        measure["error_map"] = a.error_map
    if any(p.get("guide_fixed_landmarks") or p.get("guide_moving_landmarks") for p in pairs):
        measure["guide_method"] = a.guide_method    # only then: runs without guides still --resume
    try:
        rows, summary = run_batch(pairs, a.paradigm, parse_param_args(a.param), checkpoint=a.checkpoint,
                                  device=a.device, out_dir=a.out, mode=mode, workers=a.workers,
                                  dask_scheduler=a.dask_scheduler, threads=a.threads, resume=a.resume,
                                  measure_options=measure, cancel=_cancel_event(),
                                  on_result=on_result, timeout_s=a.pair_timeout)
    except KeyboardInterrupt:
        _CANCEL.set()
        raise Cancelled(f"cancelled by the user; finished pairs are kept in {a.out}/pairs "
                        f"(run again with --resume to skip them)") from None
    finally:
        bar.close()
    print(f"{summary['pairs']} of {len(pairs)} pairs: ", end="")
    _print_summary(summary)
    if summary.get("flagged") or summary.get("with_warnings"):
        print(f"{summary.get('flagged', 0)} pair(s) flagged (a learned stage made the pair worse; the better "
              f"stage was kept), {summary.get('with_warnings', 0)} with warnings: see the 'flagged' and "
              f"'warnings' columns of results.csv")
    if summary["resumed"]:
        print(f"{summary['resumed']} of {len(pairs)} pairs were already done in {a.out} (--resume)")
    if summary["failed"]:
        errs = {f["error"] for f in summary["failed_pairs"]}
        same = f": {errs.pop()}" if len(errs) == 1 else ""
        print(f"error: {summary['failed']} of {len(pairs)} pairs failed{same} "
              f"(see the error column of {Path(a.out) / 'results.csv'})", file=sys.stderr)
        return BATCH_FAILED
    return 0


def _cmd_train(a) -> int:
    from .engine import paradigms, training
    from .engine.paradigms import parse_param_args
    if not a.paradigm:
        if a.list_options:
            for key in paradigms.trainable():
                print(f"{key}: {paradigms.description(key)}")
                _print_options(training.config_class(key), indent="    ")
            return 0
        raise ValueError(f"train needs --paradigm (one of {', '.join(paradigms.trainable())}) and --out")
    cfg_cls = training.config_class(a.paradigm)
    if a.list_options:
        _print_options(cfg_cls)
        return 0
    if not a.out:
        raise ValueError("train needs --out (the checkpoint file to write)")
    over = parse_param_args(a.param)
    over.update(out=a.out, device=a.device)
    if a.steps is not None:
        over["steps"] = a.steps
    if a.resume:
        over["resume"] = a.resume
    cfg = training.make_config(a.paradigm, over)
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, desc=f"train [{a.paradigm}]", unit="step", file=sys.stderr,
               disable=a.no_progress, dynamic_ncols=True)

    def progress(p):
        if p.iteration > bar.n:
            bar.update(p.iteration - bar.n)
        bar.set_postfix_str(p.message or f"loss {p.loss:.4g}", refresh=False)

    try:
        path = training.train(a.paradigm, cfg, progress=progress, cancel=_cancel_event())
    finally:
        bar.close()
    print(f"checkpoint written: {path}")
    return 0


def _print_options(cls, indent: str = "") -> None:
    """One line per option of a parameter dataclass: name = default, range / choices, help."""
    import dataclasses

    from .engine.paradigms.base import format_number_list
    for f in dataclasses.fields(cls):
        md = f.metadata
        extra = f" range {md['range']}" if "range" in md else ""
        extra += f" choices {'/'.join(map(str, md['choices']))}" if "choices" in md else ""
        default = format_number_list(f.default) if isinstance(f.default, tuple) else repr(f.default)
        print(f"{indent}{f.name} = {default}{extra}  {md.get('help', '')}")


def _cmd_info(a) -> int:
    if a.paradigms or not a.file:
        from .engine import paradigms
        for key in paradigms.available():
            print(f"{key}: {paradigms.description(key)}")
            _print_options(paradigms.get(key).Params, indent="    ")
        print("pipelines: --paradigm A+B+C runs A, then B from A's transform, then C (one composite transform, "
              "one resampling); --param B.name=value sets a parameter of stage B")
        return 0
    from .engine import io
    from .engine.jsonsafe import to_jsonable
    print(json.dumps(to_jsonable(io.describe_file(a.file)), indent=1))
    return 0


def _cmd_convert(a) -> int:
    from .engine import io
    v = io.convert_image(a.input, a.output, dtype=a.dtype)
    print(f"wrote {a.output}: {v.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "register":
        batch = [o for o, v in (("--workers", args.workers != 1), ("--dask-scheduler", args.dask_scheduler),
                                ("--threads", args.threads), ("--resume", args.resume),
                                ("--pair-timeout", args.pair_timeout)) if v]
        if args.pairs and (args.fixed or args.moving):
            parser.error("register takes FIXED MOVING or --pairs PAIRS.csv, not both")
        if not args.pairs and not (args.fixed and args.moving):
            parser.error("register needs FIXED MOVING (one pair) or --pairs PAIRS.csv (a batch)")
        single = [o for o in ("fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")
                  if getattr(args, o)]
        if args.pairs and single:
            parser.error(f"--{single[0].replace('_', '-')} is for one pair; with --pairs put it in the CSV's "
                         f"{single[0]} column")
        if args.pairs and (args.guide_fixed_landmarks or args.guide_moving_landmarks):
            parser.error("--guide-fixed-landmarks/--guide-moving-landmarks are for one pair, not --pairs")
        if batch and not args.pairs:
            parser.error(f"{', '.join(batch)} only apply to a batch (--pairs PAIRS.csv)")
    cmd = {"register": _cmd_register, "evaluate": _cmd_evaluate, "train": _cmd_train,
           "info": _cmd_info, "convert": _cmd_convert}[args.command]
    from .engine.types import Cancelled
    try:
        return cmd(args)
    except KeyboardInterrupt:
        _CANCEL.set()
        print("error: cancelled by the user; nothing was written", file=sys.stderr)
        return 130
    except Cancelled as e:
        print(f"error: {e}", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, MemoryError, ImportError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, MemoryError) or "out of memory" in msg.lower():
            msg = f"out of memory: {msg} (try a smaller grid, --device cpu, or fewer levels)"
        print(f"error: {msg}", file=sys.stderr)
        return 1
