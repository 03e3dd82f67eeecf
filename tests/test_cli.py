"""The foldops command: bench end to end, plot from the CSV alone, doctor, bad options."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

from foldops import backends
from foldops.bench import CSV_COLUMNS
from foldops.cli import main


def _env():
    # The interpreter is a test-suite setting; the command runs as a user would.
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("FOLDOPS_BACKEND")}


def _foldops(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "foldops", *args], capture_output=True, text=True,
                          env={**_env(), **(env or {})}, cwd=cwd, timeout=300)


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = _foldops("bench", "--device", "cpu", "--ops", "triangle_attention,outer_product_mean", "--sizes", "5,9",
                      "--repeats", "2", "--warmup", "0", "--out", str(out))
    return result, out


def test_bench_end_to_end(bench_out):
    result, out = bench_out
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["bench.csv", "outer_product_mean.png", "summary.md", "triangle_attention.png"]
    header, rows = _read(out / "bench.csv")
    assert tuple(header) == CSV_COLUMNS
    for op in ("triangle_attention", "outer_product_mean"):
        for backend in ("torch", "reference"):
            for n in (5, 9):
                for mode in ("fwd", "fwd+bwd"):
                    found = {r["metric"]: r for r in rows if r["op"] == op and r["backend"] == backend
                             and f"N={n}," in r["shape"] and r["mode"] == mode}
                    assert set(found) == {"time_ms", "peak_mib", "max_abs_err", "rel_err"}, (op, backend, n, mode)
                    assert all(r["status"] == "ok" and r["value"] != "" for r in found.values())
                    assert float(found["rel_err"]["value"]) < 1e-5
    triton = [r for r in rows if r["backend"] == "triton"]
    assert triton and all(r["status"] == "unavailable" and r["note"] for r in triton)
    assert all(r["dtype"] == "fp32" and r["torch_version"] == torch.__version__ for r in rows)
    # The terminal table and the summary.
    assert "op" in result.stdout.splitlines()[0] and "fwd+bwd ms" in result.stdout
    assert "triangle_attention" in result.stdout and "outer_product_mean" in result.stdout
    assert "bench.csv" in result.stderr and "done in" in result.stderr
    summary = (out / "summary.md").read_text()
    assert "--sizes 5,9" in summary and "| triangle_attention | torch |" in summary


def test_plot_from_the_csv_alone(bench_out, tmp_path):
    _, out = bench_out
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(out / "bench.csv", lone / "bench.csv")
    result = _foldops("plot", str(lone / "bench.csv"), "--out", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "plots")) == ["outer_product_mean.png", "triangle_attention.png"]
    assert result.stdout.split() == [str(tmp_path / "plots" / f"{op}.png") for op in ("triangle_attention", "outer_product_mean")]


def test_doctor():
    result = _foldops("doctor", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for needle in ("device:", "python", f"torch        {torch.__version__}", "triton", "numpy", "foldops      0.1.0",
                   "trifast", "cuequivariance_torch", "flash_attn", "boltz", "Triton kernels:",
                   "Triton kernels need a CUDA device, got cpu"):
        assert needle in text, needle
    try:
        import triton  # noqa: F401
    except ImportError:
        assert "launches:" not in text
    else:
        assert "launches:             " in text
        if torch.version.cuda is None:  # a CPU build never launches directly
            assert "through Triton's kernel[grid] (not an NVIDIA CUDA build" in text
    table = text[text.index("backends per op"):].splitlines()
    assert table[1].split() == ["op", "backend", "available", "reason"]
    rows = [line.split() for line in table[3:]]
    assert ["triangle_attention", "triton", "no"] == rows[0][:3]  # no kernels on a CPU
    assert ["torch", "*", "yes"] == rows[1]  # auto's choice on a CPU
    assert rows[2][:3] == ["reference", "yes", "only"]
    # Every op with backends in the registry has its line (the bench cases list them).
    import foldops.ops  # noqa: F401  (registers the backends)

    listed = [row[0] for row in rows if row and row[0] in backends.ops()]
    assert sorted(listed) == sorted(backends.ops())
    i = [row[:1] for row in rows].index(["invariant_point_attention"])
    assert rows[i + 1] == ["torch", "*", "yes"] and rows[i + 2][:2] == ["reference", "yes"]


def test_bench_measures_invariant_point_attention(tmp_path):
    result = _foldops("bench", "--device", "cpu", "--ops", "invariant_point_attention", "--sizes", "9",
                      "--repeats", "1", "--warmup", "0", "--no-plot", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    _, rows = _read(tmp_path / "bench.csv")
    for backend in ("torch", "reference"):
        for mode in ("fwd", "fwd+bwd"):
            found = {r["metric"]: r for r in rows if r["op"] == "invariant_point_attention"
                     and r["backend"] == backend and r["mode"] == mode}
            assert set(found) == {"time_ms", "peak_mib", "max_abs_err", "rel_err"}, (backend, mode)
            assert all(r["status"] == "ok" for r in found.values())
            assert float(found["rel_err"]["value"]) < 1e-5


def test_failing_backend_becomes_error_rows(tmp_path, monkeypatch, capsys):
    import foldops.ops.triangle_attention  # noqa: F401

    table = backends._REGISTRY["triangle_attention"]
    monkeypatch.setitem(table, "broken", backends.Backend(
        op="triangle_attention", name="broken", fn=lambda *a: 1 / 0, supports=lambda **_: None, priority=-1, auto=False))
    code = main(["bench", "--device", "cpu", "--ops", "triangle_attention", "--sizes", "4", "--repeats", "1", "--warmup", "0",
                 "--backends", "torch,broken", "--modes", "fwd", "--out", str(tmp_path), "--no-plot", "--quiet"])
    assert code == 0
    _, rows = _read(tmp_path / "bench.csv")
    broken = [r for r in rows if r["backend"] == "broken"]
    assert [(r["metric"], r["status"], r["note"]) for r in broken] == [("time_ms", "error", "ZeroDivisionError: division by zero")]
    assert [r["status"] for r in rows if r["backend"] == "torch"] == ["ok"] * 4
    out = capsys.readouterr()
    assert "ERR" in out.out and "ZeroDivisionError" in out.out and "1 error/OOM rows" in out.err


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required"),
    (["bench", "--sizes", "0"], "argument --sizes: expected positive integers like 32,64,96, got 0"),
    (["bench", "--sizes", "8,x"], "argument --sizes: expected positive integers like 32,64,96, got 'x'"),
    (["bench", "--ops", "triangle_attention,nope"], "argument --ops: unknown op(s) nope; expected some of: triangle_attention"),
    (["bench", "--dtype", "fp8"], "argument --dtype: expected one of ['fp32', 'bf16', 'fp16', 'fp64'], got 'fp8'"),
    (["bench", "--modes", "fwd,sideways"], "argument --modes: unknown mode(s) sideways; expected some of: fwd, fwd+bwd, bwd"),
    (["bench", "--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    (["bench", "--max-time", "0"], "argument --max-time: expected a positive number, got '0'"),
    (["bench", "--dim", "S"], "argument --dim: expected KEY=positive int such as S=64, got 'S'"),
    (["bench", "--dim", "Q=3"], "argument --dim: unknown dimension(s) ['Q'] for these ops"),
    (["bench", "--ops", "triangle_attention", "--dim", "S=3"], "unknown dimension(s) ['S']"),
    (["bench", "--dim", "N=3"], "N is swept: use --sizes"),
    (["bench", "--device", "hpu"], "argument --device: unsupported device type 'hpu'"),
    (["bench", "--device", "mps"], "argument --device: 'mps' was requested but is not available"),
    (["bench", "--backends", "tritonn"], "argument --backends: unknown backend(s) tritonn; expected some of: triton, torch, reference"),
    (["bench", "--ops", "outer_product_mean", "--backends", "torch,triton"], "unknown backend(s) triton; expected some of: torch, reference, auto"),
    (["bench", "--device", "gpu"], "argument --device:"),
    (["doctor", "--dtype", "fp32,bf16"], "argument --dtype: doctor takes one dtype, got 2"),
    (["plot", "/nonexistent/bench.csv"], "argument csv: no such file '/nonexistent/bench.csv'"),
])
def test_bad_options_give_a_clear_error(args, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if args:  # the sub-command's usage, not the top level's
        assert err.startswith(f"usage: foldops {args[0]} ")
        assert "device: device" not in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--device", "--ops", "--sizes", "--dtype", "--out", "--repeats", "--warmup", "--modes", "--backends"):
        assert option in text


def test_help_defaults_are_the_harness_defaults(capsys):
    from foldops.bench.cases import CPU_SIZES
    from foldops.bench.harness import PROFILE_DEFAULTS

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    cpu, gpu = PROFILE_DEFAULTS["cpu"], PROFILE_DEFAULTS["gpu"]
    assert f"timed runs (default {cpu['repeats']} on CPU, {gpu['repeats']} on a GPU)" in text
    assert f"(default {cpu['warmup']} on CPU, {gpu['warmup']} on a GPU; 0: none)" in text
    assert f"(default {cpu['max_time_s']:g} on CPU, {gpu['max_time_s']:g} on a GPU)" in text
    assert f"(default: {','.join(map(str, CPU_SIZES))} on CPU;" in text
    assert "(default: fp32 on CPU, bf16 on a GPU)" in text


def test_version(capsys):
    import foldops

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"foldops {foldops.__version__} (torch {torch.__version__}")


def test_doctor_flags_an_override_that_names_no_op():
    result = _foldops("doctor", "--device", "cpu", env={"FOLDOPS_BACKEND_TRIANGLE_ATENTION": "torch",
                                                        "FOLDOPS_BACKEND_TRIANGLE_ATTENTION": "torch"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    typo = next(line for line in lines if "FOLDOPS_BACKEND_TRIANGLE_ATENTION=torch" in line)
    assert "(ignored: no op is named so; ops: attention_pair_bias," in typo
    assert "  FOLDOPS_BACKEND_TRIANGLE_ATTENTION=torch" in lines


def test_doctor_into_a_closed_pipe_ends_quietly():
    # `foldops doctor | head -2`: the reader leaves early; no BrokenPipeError traceback.
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'foldops', 'doctor'], "
            "stdout=subprocess.PIPE, stderr=subprocess.PIPE); p.stdout.readline(); p.stdout.close(); "
            "err = p.stderr.read().decode(); p.wait(); print(p.returncode); print(err)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    returncode, _, err = result.stdout.partition("\n")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert returncode in ("0", "141")


def test_plot_rejects_a_file_that_is_not_a_bench_csv(tmp_path, capsys):
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(junk)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a foldops bench CSV: expected the columns op, backend, shape" in err and "has a, b" in err
    binary = tmp_path / "bench.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(binary)])
    assert exit_info.value.code == 2 and "not a foldops bench CSV" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(CSV_COLUMNS) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(empty)])
    assert exit_info.value.code == 2 and "no successful time_ms rows: nothing to plot" in capsys.readouterr().err
    assert not any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_bench_triton_on_cpu_sets_up_the_interpreter(tmp_path):
    # Named on CPU without TRITON_INTERPRET: the command turns the interpreter on and says so.
    pytest.importorskip("triton")
    result = _foldops("bench", "--device", "cpu", "--ops", "triangle_attention", "--sizes", "3", "--backends", "triton",
                      "--modes", "fwd", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--no-plot", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "Triton interpreter (TRITON_INTERPRET=1)" in result.stderr
    _, rows = _read(tmp_path / "bench.csv")
    assert {(r["metric"], r["status"]) for r in rows} == {("time_ms", "ok"), ("peak_mib", "ok"), ("max_abs_err", "ok"),
                                                           ("rel_err", "ok")}


def test_doctor_says_how_to_run_the_kernels_on_cpu():
    result = _foldops("doctor", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "set TRITON_INTERPRET=1 and name the backend" in result.stdout


def test_a_busy_cpu_bench_restarts_with_passive_omp_threads():
    from foldops.cli import OMP_RESTART_FLAG, passive_threads_env

    cpu = torch.device("cpu")
    env = passive_threads_env(cpu, {"PATH": "/bin"}, load=9.5, cores=2)
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", OMP_RESTART_FLAG: "9.5"}
    assert passive_threads_env(cpu, {}, load=1.5, cores=2) is None          # not busy
    assert passive_threads_env(cpu, {}, load=None, cores=2) is None         # no load average here
    assert passive_threads_env(cpu, {"OMP_WAIT_POLICY": "ACTIVE"}, load=9.5, cores=2) is None  # the user's
    assert passive_threads_env(cpu, env, load=9.5, cores=2) is None         # restarted already
    assert passive_threads_env(torch.device("meta"), {}, load=9.5, cores=2) is None


def test_bench_backends_accepts_auto(tmp_path, capsys):
    """``--backends auto`` times what a user gets: the auto row alone, resolved to a backend."""
    args = ["bench", "--device", "cpu", "--ops", "triangle_attention", "--sizes", "3", "--backends", "auto",
            "--modes", "fwd", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--no-plot", "--quiet"]
    assert main(args) == 0
    import csv
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["backend"] for r in rows} == {"auto"} and all(r["resolved"] for r in rows)


def test_busy_restart_happens_only_from_the_command_line(tmp_path, monkeypatch):
    import foldops.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_load_average", lambda: 99.0)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a) or (_ for _ in ()).throw(SystemExit(0)))
    args = ["bench", "--device", "cpu", "--ops", "triangle_attention", "--sizes", "3", "--backends", "torch",
            "--modes", "fwd", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--no-plot", "--quiet"]
    assert main(args) == 0 and calls == []  # main(argv) from Python: never restarts
    monkeypatch.setattr(sys, "argv", ["foldops", *args])
    with pytest.raises(SystemExit):
        main()
    (executable, argv, env), = calls
    assert argv == [sys.executable, "-m", "foldops", *args] and env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_layer_table_has_one_line_per_layer_impl_shape_mode():
    from foldops.cli import _format_layer_table

    rows = [
        dict(op="PairformerLayer", backend="foldops", shape="B=1,N=8", mode="inference", metric=m, value=v, status="ok")
        for m, v in (("time_ms", "1.5"), ("throughput_ms", "1.2"))
    ] + [dict(op="MSALayer", backend="boltz", shape="B=1,N=8,S=4", mode="training", metric="time_ms",
              value="", status="oom")]
    lines = _format_layer_table(rows).splitlines()
    assert lines[0].split() == ["layer", "impl", "shape", "mode", "latency", "ms", "throughput", "ms"]
    assert lines[2].split() == ["PairformerLayer", "foldops", "B=1,N=8", "inference", "1.5", "1.2"]
    assert lines[3].split() == ["MSALayer", "boltz", "B=1,N=8,S=4", "training", "oom", "-"]
