"""The host-time tools still run: benchmarks/host_path_cpu.py stands its recorder in for
every launch (a launcher rename once made it launch the kernels on meta tensors instead),
and benchmarks/tools/varlen_buckets_host.py times the bucketed varlen path on meta
tensors."""

import os
import re
import subprocess
import sys

import pytest

from benchmark_scripts import ROOT


@pytest.mark.parametrize("op_args", [
    ["--op", "triattn", "--n", "8"],
    ["--op", "triattn", "--public", "--n", "8", "--mask"],
    ["--op", "trimul", "--n", "16", "--c", "32"],
    ["--op", "pwa", "--n", "8", "--rows", "4", "--mask"],
], ids=["triattn", "triattn-public", "trimul", "pwa"])
def test_host_path_tool_records_launches(op_args):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_path_cpu.py"), "--calls", "3",
                          *op_args], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    launches = [int(m) for m in re.findall(r"host time: .*; (\d+) launches", run.stdout)]
    assert len(launches) == 2, run.stdout
    assert all(count >= 1 for count in launches), run.stdout


def test_varlen_buckets_host_tool_runs_with_one_plan_copy():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tools", "varlen_buckets_host.py"),
                          "--calls", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    copies = [int(m) for m in re.findall(r"host-to-device copies (\d+)", run.stdout)]
    assert copies == [1, 1, 1, 1], run.stdout  # causal x return_lse: the whole plan in one copy


def test_host_path_tool_times_a_pairformer_layer():
    """--op layer: foldops's layer launches its Triton ops through the recorder (as on an
    H100 at N = 384, where triangle attention trains with the kernel too), and reports
    aten ops and autograd nodes per step, with Boltz's layer beside it when importable."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_path_cpu.py"), "--calls", "2",
                          "--op", "layer", "--n", "6", "--as-n", "384"], capture_output=True, text=True, env=env,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    launches = dict(re.findall(r"^(\w+ \w+) +host time: .*; (\d+) launches", run.stdout, re.M))
    # inference: 2 trimul x 2 kernels + 2 triangle attention + attention with pair bias;
    # training adds the backward launches
    assert int(launches["foldops infer"]) >= 5, run.stdout
    assert int(launches["foldops train"]) > int(launches["foldops infer"]), run.stdout
    counts = dict((label, (int(aten), int(nodes))) for label, aten, nodes in
                  re.findall(r"^(\w+ \w+) +(\d+) aten ops \(\d+ not views\), (\d+) autograd nodes", run.stdout, re.M))
    assert counts["foldops train"][0] > counts["foldops infer"][0] > 0, run.stdout
    assert counts["foldops train"][1] > 0 and counts["foldops infer"][1] == 0, run.stdout
    if "boltz not importable" not in run.stdout:
        assert int(launches["boltz train"]) == 0 and counts["boltz train"][1] > 0, run.stdout
