"""The bench harness: rows, statuses, errors against fp64, timing and memory helpers."""

import csv
import io
import math
import time

import pytest
import torch

import foldops
from foldops.bench import (
    CSV_COLUMNS,
    BenchConfig,
    ProgressLine,
    Timer,
    auto_choice,
    backend_statuses,
    capture_context,
    format_table,
    measure_memory,
    parse_dtype,
    run_bench,
    write_summary,
)
from foldops.bench.harness import WARMUP_EXTRA_RUNS, compare, drifts_down, runs_agree, settle_cpu_threads
from foldops.device import device_name

from bench_fake_op import FAKE_OP, fake_op

CPU = torch.device("cpu")


def _rows(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _value(rows, **match):
    found = _rows(rows, **match)
    assert len(found) == 1, (match, found)
    return found[0]


@pytest.fixture
def fake_run(fake_case, tmp_path):
    config = BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[3, 5], modes=("fwd", "fwd+bwd", "bwd"),
                         repeats=2, warmup=0)
    skipped = []
    rows = run_bench(config, csv_path=tmp_path / "bench.csv", on_skip=skipped.append)
    return rows, tmp_path / "bench.csv", skipped


def test_csv_is_written_as_the_rows_come(fake_run):
    rows, path, skipped = fake_run
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        assert list(reader) == rows
    assert not skipped
    for r in rows:
        assert r["device"] == device_name(CPU)
        assert r["torch_version"] == torch.__version__ and r["foldops_version"] == foldops.__version__
        assert r["dtype"] == "fp32" and r["op"] == FAKE_OP


def test_a_good_backend_gets_time_memory_and_exact_errors(fake_run):
    rows, _, _ = fake_run
    for shape in ("B=1,N=3,C=3", "B=1,N=5,C=3"):
        for mode in ("fwd", "fwd+bwd", "bwd"):
            for backend in ("good", "reference"):
                t = _value(rows, backend=backend, shape=shape, mode=mode, metric="time_ms")
                assert t["status"] == "ok" and float(t["value"]) > 0 and t["note"].startswith("median of 2")
                mem = _value(rows, backend=backend, shape=shape, mode=mode, metric="peak_mib")
                assert mem["status"] == "ok" and float(mem["value"]) >= 0
                for metric in ("max_abs_err", "rel_err"):
                    err = _value(rows, backend=backend, shape=shape, mode=mode, metric=metric)
                    assert err["status"] == "ok" and float(err["value"]) == 0.0  # 2x is exact in fp32


def test_a_wrong_backend_shows_its_error(fake_run):
    rows, _, _ = fake_run
    fwd = _value(rows, backend="off_by_half", shape="B=1,N=5,C=3", mode="fwd", metric="max_abs_err")
    assert float(fwd["value"]) == pytest.approx(0.5)
    grad = _value(rows, backend="off_by_half", shape="B=1,N=5,C=3", mode="fwd+bwd", metric="max_abs_err")
    assert float(grad["value"]) == 0.0  # a constant offset has the right gradient
    assert "gradients of x" in grad["note"]


def test_failures_become_rows_not_crashes(fake_run):
    rows, _, _ = fake_run
    for mode in ("fwd", "fwd+bwd", "bwd"):
        broken = _value(rows, backend="broken", shape="B=1,N=3,C=3", mode=mode)
        assert broken["status"] == "error" and broken["metric"] == "time_ms" and broken["value"] == ""
        assert broken["note"] == "RuntimeError: kaboom"
        oom = _value(rows, backend="oom", shape="B=1,N=3,C=3", mode=mode)
        assert oom["status"] == "oom" and "out of memory" in oom["note"]
        nope = _value(rows, backend="nope", shape="B=1,N=3,C=3", mode=mode)
        assert nope["status"] == "unavailable" and nope["note"] == "needs a unicorn"
        interp = _value(rows, backend="interp", shape="B=1,N=3,C=3", mode=mode)
        assert interp["status"] == "skipped" and "runs only when named" in interp["note"]


def test_every_size_and_mode_has_an_auto_row_reusing_its_backend(fake_run):
    rows, _, _ = fake_run
    for shape in ("B=1,N=3,C=3", "B=1,N=5,C=3"):
        for mode in ("fwd", "fwd+bwd", "bwd"):
            auto = {r["metric"]: r for r in _rows(rows, backend="auto", shape=shape, mode=mode)}
            good = {r["metric"]: r for r in _rows(rows, backend="good", shape=shape, mode=mode)}
            assert set(auto) == set(good) == {"time_ms", "peak_mib", "max_abs_err", "rel_err"}
            for metric, r in auto.items():
                assert r["resolved"] == "good" and r["status"] == "ok"
                assert r["value"] == good[metric]["value"]  # the same measurement, not a second one
                assert r["note"].startswith("auto -> good (priority order); good's run: ")
    assert all(r["resolved"] == "" for r in rows if r["backend"] != "auto")


def test_auto_is_captured_per_mode(fake_case, monkeypatch):
    """A size rule for training only: fwd+bwd's auto row follows it, fwd's does not."""
    from foldops import backend_rules

    rule = backend_rules.Rule(4, "the test", "off_by_half wins training at N <= 4", backend="off_by_half")
    monkeypatch.setattr(backend_rules, "RULES", {FAKE_OP: {"cpu": {"training": rule}}})
    rows = run_bench(BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[3, 5], modes=("fwd", "fwd+bwd"),
                                 repeats=1, warmup=0))
    resolved = {(r["shape"], r["mode"]): r["resolved"] for r in _rows(rows, backend="auto", metric="time_ms")}
    assert resolved == {("B=1,N=3,C=3", "fwd"): "good", ("B=1,N=3,C=3", "fwd+bwd"): "off_by_half",
                        ("B=1,N=5,C=3", "fwd"): "good", ("B=1,N=5,C=3", "fwd+bwd"): "good"}
    ruled = _value(rows, backend="auto", shape="B=1,N=3,C=3", mode="fwd+bwd", metric="time_ms")
    assert "size rule: cpu training N=3 <= 4: off_by_half wins training at N <= 4" in ruled["note"]
    # The inference choice at the same size is the priority order's, with its own numbers.
    fwd_err = _value(rows, backend="auto", shape="B=1,N=3,C=3", mode="fwd", metric="max_abs_err")
    assert float(fwd_err["value"]) == 0.0


def test_auto_is_measured_itself_when_its_backend_was_not(fake_case, monkeypatch):
    # Named backends without auto's: no auto rows, unless "auto" is named too.
    rows = run_bench(BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[4], modes=("fwd",), backends=["reference"],
                                 repeats=1, warmup=0))
    assert not _rows(rows, backend="auto")
    rows = run_bench(BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[4], modes=("fwd",), backends=["reference", "auto"],
                                 repeats=1, warmup=0))
    auto = {r["metric"]: r for r in _rows(rows, backend="auto")}
    assert set(auto) == {"time_ms", "peak_mib", "max_abs_err", "rel_err"}
    assert all(r["resolved"] == "good" and r["status"] == "ok" for r in auto.values())
    assert auto["time_ms"]["note"].startswith("auto -> good (priority order); median of 1")
    # An override naming a backend that runs only when named: auto runs it, the plan skips it.
    monkeypatch.setenv("FOLDOPS_BACKEND" + "_" + FAKE_OP.upper(), "interp")
    rows = run_bench(BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[4], modes=("fwd",), repeats=1, warmup=0))
    assert _value(rows, backend="interp", metric="time_ms")["status"] == "skipped"
    auto = _value(rows, backend="auto", metric="time_ms")
    assert auto["status"] == "ok" and auto["resolved"] == "interp" and "FOLDOPS_BACKEND__BENCH_FAKE=interp" in auto["note"]
    # An override naming a backend that cannot run: the auto row says so.
    monkeypatch.setenv("FOLDOPS_BACKEND" + "_" + FAKE_OP.upper(), "nope")
    rows = run_bench(BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[4], modes=("fwd",), repeats=1, warmup=0))
    auto = _value(rows, backend="auto", metric="time_ms")
    assert auto["status"] == "unavailable" and auto["resolved"] == "" and "needs a unicorn" in auto["note"]


def test_the_table_shows_the_backend_auto_ran_per_mode(fake_case, monkeypatch):
    from foldops import backend_rules

    rule = backend_rules.Rule(4, "the test", "off_by_half wins training", backend="off_by_half")
    monkeypatch.setattr(backend_rules, "RULES", {FAKE_OP: {"cpu": {"training": rule}}})
    rows = run_bench(BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[3, 5], modes=("fwd", "fwd+bwd"),
                                 backends=["good", "off_by_half"], repeats=1, warmup=0))
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:6] == ["op", "backend", "shape", "dtype", "auto", "runs"]
    auto_lines = [line.split() for line in lines if line.split()[:1] == ["auto"]]
    assert [line[1:6] for line in auto_lines][0] == ["B=1,N=3,C=3", "fp32", "fwd", "good,", "fwd+bwd"]
    assert auto_lines[0][6] == "off_by_half" and float(auto_lines[0][7]) > 0
    assert auto_lines[1][1:4] == ["B=1,N=5,C=3", "fp32", "good"] and float(auto_lines[1][4]) > 0


def test_named_backends_only_and_named_only_backends_run(fake_case):
    config = BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[4], modes=("fwd",), backends=["interp", "reference"],
                         repeats=1, warmup=0)
    rows = run_bench(config)
    assert {r["backend"] for r in rows} == {"interp", "reference"}
    assert all(r["status"] == "ok" for r in rows)


def test_reference_over_budget_is_skipped_not_run(fake_case):
    config = BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[4], modes=("fwd",), backends=["good"],
                         repeats=1, warmup=0, ref_budget_gib=1e-9)
    rows = run_bench(config)
    err = _value(rows, backend="good", metric="max_abs_err")
    assert err["status"] == "skipped" and "--ref-budget-gib" in err["note"]
    assert _value(rows, backend="good", metric="time_ms")["status"] == "ok"


def test_a_reference_too_large_for_gradients_still_checks_the_output(fake_case):
    # fp64 reference of the fake case at N=4: 192 bytes without gradients, 384 with.
    config = BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[4], modes=("fwd+bwd", "fwd"), backends=["good"],
                         repeats=1, warmup=0, ref_budget_gib=300 / 2**30)
    rows = run_bench(config)
    assert _value(rows, backend="good", mode="fwd+bwd", metric="max_abs_err")["status"] == "skipped"
    fwd = _value(rows, backend="good", mode="fwd", metric="max_abs_err")
    assert fwd["status"] == "ok" and float(fwd["value"]) == 0.0


def test_an_op_that_is_not_written_yet_is_skipped(isolated_registry, tmp_path, monkeypatch):
    from foldops.bench.cases import BenchCase, CaseUnavailable, register_case

    (tmp_path / "half_written_op.py").write_text("raise RuntimeError('half written')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = dict(build=lambda d, g: {}, positional=(), grad_names=(), dims={"cpu": {"N": 0}, "gpu": {"N": 0}},
                sizes={"cpu": (4,), "gpu": (4,)}, ref_elements=lambda d: 1)
    missing = register_case(BenchCase(op="_not_yet", modules=("foldops.ops._not_yet",), **spec))
    broken = register_case(BenchCase(op="_broken", modules=("half_written_op",), **spec))
    with pytest.raises(CaseUnavailable, match=r"_not_yet: not available yet \(no function '_not_yet' in foldops.ops._not_yet, foldops.ops\)"):
        missing.load()
    with pytest.raises(CaseUnavailable, match="importing half_written_op failed .RuntimeError: half written"):
        broken.load()
    skipped = []
    rows = run_bench(BenchConfig(device=CPU, ops=["_not_yet", "_broken"], repeats=1, warmup=0), on_skip=skipped.append)
    assert [(r["op"], r["status"]) for r in rows] == [("_not_yet", "skipped"), ("_broken", "skipped")]
    assert len(skipped) == 2 and "not available yet" in skipped[0]


def test_inputs_the_op_rejects_give_one_error_row(fake_case):
    fake_case.build = lambda d, g: {"x": torch.randn(2, 3), "mask": torch.ones(2, dtype=torch.bool)}

    def strict_op(x, mask=None, *, backend="auto"):
        raise ValueError("x: expected shape (*, *, *), got (2, 3)")

    fake_case.loader = lambda: strict_op
    rows = run_bench(BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[3], repeats=1, warmup=0))
    assert len(rows) == 1
    assert rows[0]["status"] == "error" and rows[0]["note"] == "inputs: ValueError: x: expected shape (*, *, *), got (2, 3)"


def test_progress_counts_every_step(fake_case):
    seen = []
    run_bench(BenchConfig(device=CPU, ops=[FAKE_OP], sizes=[3, 4], modes=("fwd", "fwd+bwd"), repeats=1, warmup=0),
              progress=lambda done, total, text: seen.append((done, total)))
    total = 2 * (7 + 1) * 2  # sizes x (backends + auto) x modes
    assert seen == [(i, total) for i in range(1, total + 1)]


# The real cases ---------------------------------------------------------------------------------

def test_every_loadable_case_runs_clean_on_cpu(tmp_path):
    """Wiring check of every case whose op exists: no failures, and the errors of
    fp32 runs against fp64 are at fp32 rounding level (a mis-wired argument is O(1))."""
    from foldops.bench.cases import CaseUnavailable, get_cases

    loadable = []
    for case in get_cases():
        try:
            case.load()
            loadable.append(case.op)
        except CaseUnavailable:
            pass
    assert "triangle_attention" in loadable
    rows = run_bench(BenchConfig(device=CPU, ops=loadable, sizes=[7], repeats=1, warmup=0))
    assert {r["op"] for r in rows} == set(loadable)
    failures = [(r["op"], r["backend"], r["mode"], r["note"]) for r in rows if r["status"] in ("error", "oom")]
    assert not failures
    measured = _rows(rows, status="ok", metric="rel_err")
    assert {r["op"] for r in measured} == set(loadable)
    for r in measured:
        assert float(r["value"]) < 1e-5, r


# Helpers ---------------------------------------------------------------------------------------------

def test_capture_context_and_statuses(fake_case):
    x = torch.randn(1, 4, 3)
    ctx = capture_context(FAKE_OP, lambda: fake_op(x))
    assert ctx == {"device": x.device, "dtype": torch.float32, "n": 4, "training": False}
    x.requires_grad_(True)
    assert capture_context(FAKE_OP, lambda: fake_op(x), grad=True)["training"] is True
    assert capture_context(FAKE_OP, lambda: fake_op(x))["training"] is False  # no_grad by default
    statuses = {s.name: s for s in backend_statuses(FAKE_OP, ctx)}
    assert auto_choice(FAKE_OP, ctx) == ("good", "priority order")
    assert statuses["good"].selected and statuses["good"].available and not statuses["good"].named_only
    assert statuses["nope"].reason == "needs a unicorn" and not statuses["nope"].available
    assert statuses["interp"].named_only and not statuses["interp"].selected
    assert statuses["reference"].available and not statuses["reference"].auto
    assert capture_context(FAKE_OP, lambda: x * 2) is None  # never selected
    with pytest.raises(ValueError, match="rejected"):
        capture_context(FAKE_OP, lambda: (_ for _ in ()).throw(ValueError("rejected")))


def test_capture_context_of_a_real_op():
    from foldops.ops import triangle_attention

    q = torch.randn(1, 3, 3, 2, 16)
    bias = torch.randn(1, 2, 3, 3)
    ctx = capture_context("triangle_attention", lambda: triangle_attention(q, q, q, bias))
    assert ctx["device"] == q.device and ctx["dtype"] == q.dtype and ctx["head_dim"] == 16


def test_timer_counts_runs_and_stops_early():
    calls = {"setup": 0, "timed": 0}

    def setup():
        calls["setup"] += 1
        return 7

    def timed(state):
        assert state == 7
        calls["timed"] += 1

    timer = Timer(CPU)
    assert not timer.events
    times = timer.measure(timed, setup, warmup=2, repeats=4, max_time_s=60.0)
    assert len(times) == 4 and all(t >= 0 for t in times)
    # Warm-up: at least 2 runs, and 3 that agree (a no-op agrees within the floor, unless a
    # busy machine preempts it); timed runs that drift down are retaken at most twice.
    assert calls["setup"] == calls["timed"] and 3 + 4 <= calls["timed"] <= 2 + WARMUP_EXTRA_RUNS + 3 * 4
    calls.update(setup=0, timed=0)
    times = Timer(CPU).measure(timed, setup, warmup=0, repeats=100, max_time_s=1e-9)
    assert len(times) == 3 and calls["timed"] == 3  # warmup=0: none; the minimum, then the time cap


class _ScriptedCalls:
    """A call whose duration follows a script, on a fake clock the harness reads."""

    def __init__(self, monkeypatch, durations_ms):
        import types

        from foldops.bench import harness

        self.durations = list(durations_ms)
        self.calls = 0
        self.now = 0.0
        monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: self.now))

    def __call__(self, _):
        self.now += self.durations[min(self.calls, len(self.durations) - 1)] / 1e3
        self.calls += 1


def test_warm_up_runs_until_the_first_call_effects_are_gone(monkeypatch):
    # Slow first calls, then a tail of slower-than-steady ones: the timing sees neither.
    timed = _ScriptedCalls(monkeypatch, [40, 30, 20, 20, 10, 8, 6] + [1])
    times = Timer(CPU).measure(timed, warmup=2, repeats=5, max_time_s=60.0)
    assert times == pytest.approx([1.0] * 5) and timed.calls == 7 + 3 + 5  # warm-up: the 7 slow calls, then 3 that agree


def test_timed_runs_that_drift_down_are_taken_again(monkeypatch):
    # A plateau longer than the warm-up window: the warm-up's 3 runs agree at 20 ms, the
    # timed runs drift down (20, 20, 1, 1, 1) and are taken again.
    timed = _ScriptedCalls(monkeypatch, [20] * 5 + [1])
    times = Timer(CPU).measure(timed, warmup=2, repeats=5, max_time_s=60.0)
    assert times == pytest.approx([1.0] * 5) and timed.calls == 3 + 5 + 5


def test_warm_up_is_bounded(monkeypatch):
    timer = Timer(CPU)
    flip = []

    def host_time(timed, setup):  # never agrees: alternates 1 ms and 4 ms
        flip.append(None)
        return 4.0 if len(flip) % 2 else 1.0
    monkeypatch.setattr(timer, "_host_time", host_time)
    seen = timer.warm_up(None, None, warmup=2, max_time_s=60.0)
    assert seen[:4] == [4.0, 1.0, 4.0, 1.0] and len(seen) == 2 + WARMUP_EXTRA_RUNS

    def slow_host_time(timed, setup):
        time.sleep(0.01)
        return host_time(timed, setup)
    monkeypatch.setattr(timer, "_host_time", slow_host_time)
    seen = timer.warm_up(None, None, warmup=2, max_time_s=0.05)
    assert 2 <= len(seen) < 2 + WARMUP_EXTRA_RUNS


def test_runs_agree_and_drift():
    assert not runs_agree([1.0, 1.0])
    assert runs_agree([50.0, 1.0, 1.05, 0.95])
    assert not runs_agree([1.0, 1.0, 2.0])
    assert runs_agree([0.001, 0.01, 0.015])  # within the absolute floor
    assert drifts_down([24, 24, 24, 0.24, 0.24, 0.24])
    assert not drifts_down([1.0, 1.1, 0.9, 1.0]) and not drifts_down([5.0, 1.0, 1.0])


def test_cpu_peak_memory_sees_a_temporary():
    def run():
        t = torch.ones(1 << 20)  # 4 MiB, freed on return
        return float(t[0])

    peak = measure_memory(CPU, run)
    assert peak is not None and 4.0 <= peak < 4.5


def test_compare():
    exact = torch.tensor([1.0, -4.0], dtype=torch.float64)
    assert compare([torch.tensor([1.0, -4.0])], [exact]) == (0.0, 0.0)
    abs_err, rel_err = compare([torch.tensor([1.5, -4.0]), torch.tensor([1.0, -3.0])], [exact, exact])
    assert abs_err == 1.0 and rel_err == 0.25
    assert compare([torch.tensor([float("nan"), 0.0])], [exact])[0] == math.inf
    assert compare([None], [None]) == (0.0, 0.0)
    assert compare([None], [exact]) == (4.0, 1.0)  # a missing gradient counts as zeros
    with pytest.raises(ValueError, match=r"result 0: shape \(3,\) != reference shape \(2,\)"):
        compare([torch.zeros(3)], [exact])


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("half", torch.float16),
                                         ("FP64", torch.float64)])
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) == dtype


def test_parse_dtype_rejects_unknown():
    with pytest.raises(ValueError, match=r"dtype: expected one of \['fp32', 'bf16', 'fp16', 'fp64'\], got 'fp8'"):
        parse_dtype("fp8")


def test_config_defaults_and_checks():
    cpu = BenchConfig(device=CPU).resolved()
    assert cpu.dtypes == (torch.float32,) and cpu.repeats >= 1 and cpu.warmup >= 0 and cpu.profile == "cpu"
    gpu = BenchConfig(device=torch.device("meta")).resolved()
    assert gpu.profile == "gpu" and gpu.dtypes == (torch.bfloat16,)
    for bad, message in [
        (dict(modes=("fwd", "back")), "modes: expected some of"),
        (dict(modes=()), "modes: expected some of"),
        (dict(sizes=[0]), "sizes: expected positive ints"),
        (dict(repeats=0), "repeats: expected an int >= 1, got 0"),
        (dict(warmup=-1), "warmup: expected an int >= 0, got -1"),
        (dict(max_time_s=0), "max_time_s: expected a positive number"),
        (dict(ops=["nope"]), r"ops: unknown op\(s\) \['nope'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            BenchConfig(device=CPU, **bad).resolved()


def test_table_and_summary(fake_run, tmp_path):
    rows, _, _ = fake_run
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["op", "backend", "shape", "dtype"]
    assert "fwd ms" in lines[0] and "fwd+bwd ms" in lines[0] and "grad rel err" in lines[0]
    assert any(line.split()[:1] == ["broken"] and "ERR" in line for line in lines)
    assert any("OOM" in line for line in lines)
    assert "Notes:" in table and "RuntimeError: kaboom" in table and "needs a unicorn" in table
    write_summary(tmp_path / "summary.md", rows, {"command": "foldops bench"})
    text = (tmp_path / "summary.md").read_text()
    assert "- command: foldops bench" in text and "| op | backend | shape | dtype |" in text


def test_progress_line_on_a_log_and_on_a_terminal():
    log = io.StringIO()
    progress = ProgressLine(log, every=2)
    for i in range(1, 6):
        progress(i, 5, f"step {i}")
    lines = log.getvalue().splitlines()
    assert [line.split("] ")[1] for line in lines] == ["step 2", "step 4", "step 5"]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    progress = ProgressLine(tty)
    progress(1, 2, "a long first step")
    progress(2, 2, "b")
    progress.message("skipped x")
    out = tty.getvalue()
    assert out.count("\r") >= 3 and "\n" not in out.replace("skipped x\n", "")
    assert out.endswith("skipped x\n")


def test_summary_explains_where_auto_measured_slower(tmp_path):
    from foldops.bench.report import auto_notes

    def row(backend, metric, value, resolved=""):
        return {"op": "opm", "backend": backend, "resolved": resolved, "shape": "N=64", "dtype": "fp32",
                "mode": "fwd", "metric": metric, "value": str(value), "status": "ok", "note": ""}
    rows = [row("torch", "time_ms", 3.0), row("reference", "time_ms", 1.0),
            row("torch", "peak_mib", 2.0), row("reference", "peak_mib", 8.0),
            row("auto", "time_ms", 3.0, "torch"), row("auto", "peak_mib", 2.0, "torch")]
    notes = auto_notes(rows)
    assert len(notes) == 1
    assert "opm fwd: auto's choice `torch` measured slower than `reference` (N=64 fp32: 3 vs 1 ms, peak 2 vs 8 MiB)" in notes[0]
    assert "auto never picks `reference`" in notes[0]
    assert auto_notes(rows[:1] + [row("reference", "time_ms", 2.9), rows[4]]) == []  # within noise
    assert auto_notes(rows[:4]) == []  # no auto rows: nothing to say
    write_summary(tmp_path / "summary.md", rows, {"command": "foldops bench"})
    assert "## Where auto's choice measured slower" in (tmp_path / "summary.md").read_text()


def test_cpu_threads_settle_within_the_bound():
    threads = torch.get_num_threads()
    began = time.perf_counter()
    spent, why = settle_cpu_threads(max_s=0.3)
    assert time.perf_counter() - began < 0.3 + 2.0 and 0 <= spent
    assert why is None or ("slower than one thread" in why and "OMP_NUM_THREADS=1" in why)
    assert torch.get_num_threads() == threads
