"""The ``foldops`` command: ``doctor``, ``bench`` and ``plot``.

    foldops doctor                   # device, versions, kernels, backends per op
    foldops bench                    # every op, backend, a sweep of sizes -> ./foldops-bench/
    foldops bench --ops triangle_attention --sizes 256,512 --dtype bf16 --out results/
    foldops plot foldops-bench/bench.csv

Heavy imports happen inside the commands, so ``foldops --help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shlex
import sys
import time
from typing import IO, Dict, List, Optional, Sequence

import torch

PEERS = (
    # (import name, distribution name)
    ("trifast", "trifast"),
    ("cuequivariance_torch", "cuequivariance-torch"),
    ("flash_attn", "flash-attn"),
    ("boltz", "boltz"),
)


# Argument types: each raises ArgumentTypeError with the expected and the actual value.

def _csv_list(text: str) -> List[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _positive_int_list(text: str) -> List[int]:
    values = []
    for item in _csv_list(text):
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected positive integers like 32,64,96, got {item!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers like 32,64,96, got {value}")
        values.append(value)
    return values


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _ops(text: str) -> Optional[List[str]]:
    from foldops.bench.cases import CASES

    if text.strip() == "all":
        return None
    names = _csv_list(text)
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s) {', '.join(unknown)}; expected some of: {', '.join(CASES)} or all")
    return names


def _dtypes(text: str) -> List[torch.dtype]:
    from foldops.bench.harness import parse_dtype

    try:
        return [parse_dtype(name) for name in _csv_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("dtype: ", "")) from None


def _modes(text: str) -> List[str]:
    from foldops.bench.harness import MODES

    modes = _csv_list(text)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown)}; expected some of: {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def _dim(text: str):
    key, sep, value = text.partition("=")
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not sep or not key.strip() or number < 1:
        raise argparse.ArgumentTypeError(f"expected KEY=positive int such as S=64, got {text!r}")
    return key.strip(), number


def _device_help() -> str:
    from foldops import device as fdevice

    types = getattr(fdevice, "_DEVICE_TYPES", ())
    return f"auto (default: the first available of {', '.join(types)}), a device type, or type:index"


_DEVICE_HELP = _device_help()


def _version_string() -> str:
    import foldops

    return f"foldops {foldops.__version__} (torch {torch.__version__}, python {platform.python_version()})"


def _defaults_help(field: str, fmt=str) -> str:
    """'X on CPU, Y on a GPU' from the harness's own defaults."""
    from foldops.bench.harness import PROFILE_DEFAULTS

    cpu, gpu = PROFILE_DEFAULTS["cpu"][field], PROFILE_DEFAULTS["gpu"][field]
    return f"{fmt(cpu)} on CPU, {fmt(gpu)} on a GPU"


def _dtypes_text(dtypes) -> str:
    from foldops.bench.harness import dtype_name

    return ",".join(dtype_name(d) for d in dtypes)


def _sizes_help() -> str:
    from foldops.bench.cases import get_cases

    per_profile = []
    for profile, where in (("cpu", "CPU"), ("gpu", "a GPU")):
        sizes = {tuple(case.sizes[profile]) for case in get_cases()}
        text = ",".join(map(str, sizes.pop())) if len(sizes) == 1 else "per op"
        per_profile.append(f"{text} on {where}")
    return "; ".join(per_profile)


def build_parser() -> argparse.ArgumentParser:
    from foldops.bench.harness import DEFAULT_MODES

    parser = argparse.ArgumentParser(prog="foldops", description="foldops: fast, portable biomolecular building blocks")
    parser.add_argument("--version", action="version", version=_version_string())
    sub = parser.add_subparsers(dest="command", metavar="{doctor,bench,plot}")
    sub.required = True

    doctor = sub.add_parser("doctor", help="device, versions, Triton kernels and backend availability")
    doctor.set_defaults(subparser=doctor)
    doctor.add_argument("--device", default="auto", help=_DEVICE_HELP)
    doctor.add_argument("--dtype", type=_dtypes, default=None,
                        help="dtype of the representative inputs (default: fp32 on CPU, bf16 elsewhere)")

    bench = sub.add_parser(
        "bench", help="time, memory and accuracy of every op and backend",
        description="Benchmark each op with each backend that can run here over a sweep of sizes N: "
                    "median time, peak memory where measurable, and error against the fp64 reference; "
                    "a table on the terminal, bench.csv, summary.md and one PNG per op in --out.",
    )
    bench.set_defaults(subparser=bench)
    bench.add_argument("--device", default="auto", help=_DEVICE_HELP)
    bench.add_argument("--ops", type=_ops, default=None, help="comma-separated ops, or all (default)")
    bench.add_argument("--sizes", type=_positive_int_list, default=None,
                       help=f"comma-separated N (default: {_sizes_help()})")
    bench.add_argument("--dtype", type=_dtypes, default=None,
                       help="comma-separated dtypes: fp32, bf16, fp16, fp64 "
                            f"(default: {_defaults_help('dtypes', _dtypes_text)})")
    bench.add_argument("--modes", type=_modes, default=None,
                       help=f"comma-separated: fwd, fwd+bwd, bwd (default {','.join(DEFAULT_MODES)})")
    bench.add_argument("--backends", type=_csv_list, default=None,
                       help="only these backends (named ones run even where auto would skip them; triton on "
                            "CPU runs the Triton interpreter); default: every registered backend that can run")
    bench.add_argument("--out", default="foldops-bench", help="output folder (default ./foldops-bench)")
    bench.add_argument("--repeats", type=_int_at_least(1), default=None,
                       help=f"timed runs (default {_defaults_help('repeats')})")
    bench.add_argument("--warmup", type=_int_at_least(0), default=None,
                       help="untimed runs first, at least; more until the last runs agree, bounded "
                            f"(default {_defaults_help('warmup')}; 0: none)")
    bench.add_argument("--max-time", type=_positive_float, default=None, dest="max_time",
                       help="seconds per measurement before stopping early, after 3 runs "
                            f"(default {_defaults_help('max_time_s', lambda v: f'{v:g}')})")
    bench.add_argument("--dim", type=_dim, action="append", default=[], metavar="KEY=VALUE",
                       help="override a fixed dimension of the cases, e.g. --dim S=256 --dim H=8 (repeatable)")
    bench.add_argument("--ref-budget-gib", type=_positive_float, default=None, dest="ref_budget_gib",
                       help="largest fp64 reference to run for the error columns "
                            f"(default {_defaults_help('ref_budget_gib', lambda v: f'{v:g}')})")
    bench.add_argument("--seed", type=_int_at_least(0), default=0, help="input seed (default 0)")
    bench.add_argument("--layers", action="store_true",
                       help="also time whole layers (PairformerLayer, MSALayer; Boltz's beside them when "
                            "boltz imports), inference and training, latency and throughput: layers.csv")
    bench.add_argument("--layer-sizes", type=_positive_int_list, default=None, dest="layer_sizes",
                       help="N of the layer group (default: 256,384 on accelerators, 16,32 on CPU)")
    bench.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    bench.add_argument("--quiet", action="store_true", help="no progress line")

    plot = sub.add_parser("plot", help="draw the PNGs of a bench CSV")
    plot.set_defaults(subparser=plot)
    plot.add_argument("csv", help="a bench.csv written by foldops bench")
    plot.add_argument("--out", default=None, help="output folder (default: beside the CSV)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub_parser = args.subparser  # errors print the sub-command's usage
    try:
        if args.command == "doctor":
            return _doctor_command(sub_parser, args)
        if args.command == "bench":
            return _bench_command(sub_parser, args, list(sys.argv[1:] if argv is None else argv),
                                  may_restart=argv is None)
        return _plot_command(sub_parser, args)
    except BrokenPipeError:
        # The reader went away (`foldops doctor | head`): stop quietly, as POSIX tools do.
        _silence_stdout()
        return 141  # 128 + SIGPIPE


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    from foldops.device import resolve_device

    try:
        return resolve_device(name)
    except (ValueError, TypeError, RuntimeError) as exc:
        message = str(exc)
        if message.startswith("device: "):  # the argument is named once, by the prefix below
            message = message[len("device: "):]
        parser.error(f"argument --device: {message}")
        raise  # pragma: no cover - parser.error exits


# doctor ------------------------------------------------------------------------------------

def _version(module_name: str, dist_name: Optional[str] = None) -> str:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
            return "not installed"
        return f"not importable ({type(exc).__name__}: {exc})"
    except Exception as exc:  # a broken install
        return f"not importable ({type(exc).__name__}: {exc})"
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(dist_name or module_name)
        except Exception:
            version = "unknown version"
    return str(version)


def _capability(dev: torch.device) -> str:
    # Device-generic: torch.<type>.get_device_capability where the device type has one.
    module = getattr(torch, dev.type, None)
    get = getattr(module, "get_device_capability", None)
    if dev.type == "cpu" or get is None:
        return "n/a"
    try:
        cap = get(dev)
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    if isinstance(cap, tuple):
        return ".".join(str(c) for c in cap)
    return str(cap)


def doctor(device: torch.device, dtype: Optional[torch.dtype] = None, stream: Optional[IO[str]] = None) -> None:
    """Print what foldops can do on ``device``: versions, kernels, backends per op."""
    import foldops
    from foldops import backends
    from foldops import device as fdevice
    from foldops.bench.cases import CaseUnavailable, get_cases
    from foldops.bench.harness import dtype_name
    from foldops.bench.probe import backend_statuses, capture_context

    out = stream if stream is not None else sys.stdout

    def say(text: str = "") -> None:
        out.write(text + "\n")

    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    say("foldops doctor")
    say(f"  device:      {device} - {fdevice.device_name(device)}")
    say(f"  capability:  {_capability(device)}")
    say("versions:")
    say(f"  python       {platform.python_version()} ({sys.executable})")
    say(f"  torch        {torch.__version__}")
    triton_version = _version("triton")
    if triton_version == "not installed":
        triton_version += " (optional, for the GPU kernels: pip install 'foldops[triton]')"
    say(f"  triton       {triton_version}")
    say(f"  numpy        {_version('numpy')}")
    say(f"  foldops      {foldops.__version__}")
    say("peers (optional):")
    for module_name, dist_name in PEERS:
        say(f"  {module_name:<21}{_version(module_name, dist_name)}")
    say("Triton kernels:")
    auto_reason = fdevice.kernel_support(device, explicit=False)
    named_reason = fdevice.kernel_support(device, explicit=True)
    say(f"  used by auto:         {'yes' if auto_reason is None else 'no - ' + auto_reason}")
    say(f"  run when named:       {'yes' if named_reason is None else 'no - ' + named_reason}")
    say(f"  TRITON_INTERPRET:     {os.environ.get('TRITON_INTERPRET', '(unset)')}")
    if fdevice.triton_import_error() is None:
        from foldops.kernels import _launch

        say(f"  launches:             {_launch.describe()}")
    if device.type == "cpu" and not fdevice.triton_interpret() and fdevice.triton_import_error() is None:
        say("  (on CPU the kernels run only under the Triton interpreter, to check results: set "
            "TRITON_INTERPRET=1 and name the backend, or `foldops bench --backends triton`)")
    overrides = {k: v for k, v in sorted(os.environ.items()) if k.startswith(backends.ENV_GLOBAL)}
    say("backend overrides:")
    if overrides:
        import foldops.ops  # noqa: F401 (registers every op)

        known_vars = {backends.ENV_GLOBAL} | {f"{backends.ENV_GLOBAL}_{op.upper()}" for op in backends.ops()}
        for key, value in overrides.items():
            ignored = "" if key in known_vars else f"  (ignored: no op is named so; ops: {', '.join(backends.ops())})"
            say(f"  {key}={value}{ignored}")
    else:
        say(f"  none ({backends.ENV_GLOBAL}, {backends.ENV_GLOBAL}_<OP>)")

    profile = "cpu" if device.type == "cpu" else "gpu"
    say(f"backends per op (representative input at N=16, {dtype_name(dtype)}; * = auto's choice):")
    table: List[List[str]] = [["op", "backend", "available", "reason"]]
    for case in get_cases():
        try:
            fn = case.load()
        except CaseUnavailable as exc:
            table.append([case.op, "-", "no", f"op not importable: {exc}"])
            continue
        dims = case.dims_for(profile, 16)
        try:
            inputs = case.make(dims, dtype, device)
            ctx = capture_context(case.registry_op, lambda: case.call(fn, inputs, backends.AUTO))
        except Exception as exc:
            table.append([case.op, "-", "no", f"inputs {case.shape_string(dims)} rejected: {type(exc).__name__}: {exc}"])
            continue
        if case.registry_op not in backends.ops():
            table.append([case.op, "-", "no", f"no backends registered under {case.registry_op!r}"])
            continue
        if ctx is None:
            names = ", ".join(b.name for b in backends.backends_of(case.registry_op))
            table.append([case.op, names, "?", "the op did not select through foldops.backends.select"])
            continue
        first = True
        for status in backend_statuses(case.registry_op, ctx):
            if status.reason is not None:
                available, reason = "no", status.reason
            elif status.named_only:
                available, reason = "named", f"not for auto: {status.auto_reason}"
            else:
                available, reason = "yes", "" if status.auto else "only when named (not used by auto)"
            name = status.name + (" *" if status.selected else "")
            if first and case.registry_op != case.op:
                reason = f"(backends of {case.registry_op}) {reason}".rstrip()
            table.append([case.op if first else "", name, available, reason])
            first = False
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    for index, line in enumerate(table):
        say("  " + "  ".join(c.ljust(w) for c, w in zip(line[:3], widths)) + "  " + line[3])
        if index == 0:
            say("  " + "  ".join("-" * w for w in widths) + "  " + "-" * 6)


def _doctor_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    device = _resolve_device(parser, args.device)
    if args.dtype is not None and len(args.dtype) != 1:
        parser.error(f"argument --dtype: doctor takes one dtype, got {len(args.dtype)}")
    doctor(device, None if args.dtype is None else args.dtype[0])
    return 0


# bench -------------------------------------------------------------------------------------

def _check_backends(parser: argparse.ArgumentParser, ops: Optional[List[str]], names: List[str]) -> None:
    """Every name in ``--backends`` must be registered for at least one of the ops."""
    from foldops import backends
    from foldops.bench.cases import CaseUnavailable, get_cases

    known: List[str] = []
    for case in get_cases(ops):
        try:
            case.load()  # importing the op registers its backends
        except CaseUnavailable:
            continue
        if case.registry_op in backends.ops():
            known += [b.name for b in backends.backends_of(case.registry_op)]
    known = list(dict.fromkeys(known + [backends.AUTO]))  # auto: what a user gets
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"argument --backends: unknown backend(s) {', '.join(unknown)}; "
                     f"expected some of: {', '.join(known)}")


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not offered on this platform
        return None


OMP_RESTART_FLAG = "FOLDOPS_BENCH_SET_OMP_WAIT_POLICY"


def passive_threads_env(device: torch.device, environ: Dict[str, str], load: Optional[float],
                        cores: int) -> Optional[Dict[str, str]]:
    """The environment to restart a CPU bench in on an oversubscribed machine, or None.

    OpenMP worker threads spin while they wait for work; when other processes hold the
    cores (load average above their number), that spinning made 2-thread calls here
    5-15x slower, and 100x for the first seconds. ``OMP_WAIT_POLICY=PASSIVE`` makes them
    sleep instead. OpenMP reads it when torch loads, so it takes a restart. A policy the
    user set is kept.
    """
    if device.type != "cpu" or "OMP_WAIT_POLICY" in environ or OMP_RESTART_FLAG in environ:
        return None
    if load is None or load <= cores:
        return None
    return {**environ, "OMP_WAIT_POLICY": "PASSIVE", OMP_RESTART_FLAG: f"{load:.1f}"}


def _bench_command(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: List[str],
                   may_restart: bool = False) -> int:
    import foldops
    from foldops import device as fdevice
    from foldops.bench.cases import get_cases
    from foldops.bench.harness import DEFAULT_MODES, BenchConfig, dtype_name, run_bench
    from foldops.bench.report import ProgressLine, format_table, write_summary

    device = _resolve_device(parser, args.device)
    if may_restart:
        env = passive_threads_env(device, dict(os.environ), _load_average(), os.cpu_count() or 1)
        if env is not None:
            sys.stderr.write(f"the machine is busy (load average {env[OMP_RESTART_FLAG]} on {os.cpu_count()} "
                             "cores): restarting with OMP_WAIT_POLICY=PASSIVE so that idle torch threads "
                             "sleep instead of spinning\n")
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, "-m", "foldops", *argv], env)
    if args.backends is not None:
        _check_backends(parser, args.ops, args.backends)
        if "triton" in args.backends and device.type == "cpu" and not fdevice.triton_interpret():
            # Named on CPU: the kernels can only run under the Triton interpreter, which is
            # read from the environment when the kernel modules are first imported (below).
            os.environ["TRITON_INTERPRET"] = "1"
            sys.stderr.write("--backends triton on CPU: running the Triton kernels under the Triton "
                             "interpreter (TRITON_INTERPRET=1), which checks results but is slow\n")
    dims: Dict[str, int] = dict(args.dim)
    if dims:
        known = set()
        for case in get_cases(args.ops):
            known.update(case.dim_names())
        unknown = sorted(set(dims) - known)
        if unknown or "N" in dims:
            parser.error(f"argument --dim: unknown dimension(s) {unknown or ['N']} for these ops; "
                         f"expected some of {sorted(known - {'N'})} (N is swept: use --sizes)")
    config = BenchConfig(
        device=device, ops=args.ops, sizes=args.sizes, dtypes=args.dtype,
        modes=args.modes or DEFAULT_MODES, backends=args.backends, warmup=args.warmup,
        repeats=args.repeats, max_time_s=args.max_time, dims=dims, ref_budget_gib=args.ref_budget_gib,
        seed=args.seed,
    )
    try:
        config = config.resolved()
    except ValueError as exc:
        parser.error(str(exc))
    out = os.path.abspath(args.out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        parser.error(f"argument --out: cannot create {out}: {exc}")
    csv_path = os.path.join(out, "bench.csv")

    progress = ProgressLine(sys.stderr)
    sys.stderr.write(
        f"foldops bench on {fdevice.device_name(device)}: dtype {','.join(dtype_name(d) for d in config.dtypes)}, "
        f"modes {','.join(config.modes)}, writing {csv_path}\n"
    )
    load_before = _load_average() if device.type == "cpu" else None
    started = time.perf_counter()
    if device.type == "cpu":
        from foldops.bench.harness import settle_cpu_threads

        _, unsettled = settle_cpu_threads()
        if unsettled:
            progress.message(f"note: {unsettled}")
    rows = run_bench(config, csv_path=csv_path, progress=None if args.quiet else progress,
                     on_skip=progress.message)
    progress.finish()
    layer_rows = _bench_layers(args, device, config, out) if args.layers else []
    elapsed = time.perf_counter() - started

    print(format_table(rows))
    if layer_rows:
        print()
        print(_format_layer_table(layer_rows))
    from foldops.bench.report import auto_notes

    slower = auto_notes(rows)
    if slower:
        print(f"\nauto's choice measured slower than another backend for {len(slower)} op/mode pair(s); "
              "summary.md says where and why.")
    context = {
        "command": "foldops " + " ".join(shlex.quote(a) for a in argv),
        "device": fdevice.device_name(device),
        "torch": torch.__version__,
        "foldops": foldops.__version__,
        "dtype": ",".join(dtype_name(d) for d in config.dtypes),
        "timing": f"median of up to {config.repeats} runs after {config.warmup} warm-up, "
                  f"at most ~{config.max_time_s:g} s per measurement",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall time": f"{elapsed:.1f} s",
    }
    busy = None
    if load_before is not None:
        load_after = _load_average()
        cores = os.cpu_count() or 1
        context["load average"] = f"{load_before:.1f} before, {load_after:.1f} after, on {cores} cores"
        if OMP_RESTART_FLAG in os.environ:
            context["threads"] = (f"OMP_WAIT_POLICY=PASSIVE, set by foldops bench (load average "
                                  f"{os.environ[OMP_RESTART_FLAG]} at the start)")
        if max(load_before, load_after or 0.0) > cores:
            busy = (f"the machine was busy (load average {max(load_before, load_after or 0.0):.1f} on {cores} "
                    "cores): other processes disturbed these CPU timings; compare backends within this run, "
                    "or rerun when it is idle")
            context["warning"] = busy
    write_summary(os.path.join(out, "summary.md"), rows, context)
    written = [csv_path, os.path.join(out, "summary.md")]
    if layer_rows:
        written.append(os.path.join(out, "layers.csv"))
    if not args.no_plot:
        try:
            from foldops.bench.plot import NotABenchCsv, plot_csv

            try:
                written += [str(p) for p in plot_csv(csv_path, out)]
            except NotABenchCsv as exc:  # every measurement failed
                sys.stderr.write(f"no plots: {exc}\n")
        except ImportError as exc:
            sys.stderr.write(f"no plots: {exc} (pip install 'foldops[bench]')\n")
    failures = sum(1 for r in rows if r["status"] in ("error", "oom"))
    if busy:
        sys.stderr.write(f"note: {busy}\n")
    sys.stderr.write(
        f"done in {elapsed:.1f} s; {len(rows)} rows, {failures} error/OOM rows; wrote:\n"
        + "".join(f"  {p}\n" for p in written)
    )
    return 0


def _bench_layers(args: argparse.Namespace, device: torch.device, config, out: str) -> List[Dict[str, str]]:
    """The layer group (``foldops.bench.layers``) into ``layers.csv``, in the first dtype asked for."""
    import csv

    from foldops.bench.harness import CSV_COLUMNS
    from foldops.bench.layers import run_layers

    sizes = args.layer_sizes or ((16, 32) if device.type == "cpu" else (256, 384))
    rows = run_layers(device, sizes=sizes, dtype=config.dtypes[0])
    with open(os.path.join(out, "layers.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _format_layer_table(rows: List[Dict[str, str]]) -> str:
    """One line per (layer, implementation, shape, mode): latency and throughput in ms."""
    table: Dict[tuple, Dict[str, str]] = {}
    for r in rows:
        cell = r["value"] if r["status"] == "ok" else r["status"]
        table.setdefault((r["op"], r["backend"], r["shape"], r["mode"]), {})[r["metric"]] = cell
    header = ("layer", "impl", "shape", "mode", "latency ms", "throughput ms")
    lines = [(*key, m.get("time_ms", "-"), m.get("throughput_ms", "-")) for key, m in table.items()]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines])


def _plot_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from foldops.bench.plot import NotABenchCsv, plot_csv

    if not os.path.isfile(args.csv):
        parser.error(f"argument csv: no such file {args.csv!r}")
    try:
        paths = plot_csv(args.csv, args.out)
    except NotABenchCsv as exc:
        parser.error(f"argument csv: {exc}")
    except ImportError as exc:
        sys.stderr.write(f"foldops plot: {exc} (pip install 'foldops[bench]')\n")
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
