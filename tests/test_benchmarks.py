"""The benchmarks run as scripts and print what they promise (ratios, the GPU table)."""

import json
import re
import subprocess
import sys

from tests.conftest import REPO


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    return done.stdout


def test_the_sampling_benchmark_checks_both_loops_agree_and_prints_its_ratio():
    out = run("benchmarks/sampling.py", "--student", "tiny-lumina", "--images", "4").strip().splitlines()
    assert "codes equal between the loops: 100.0%" in out
    assert re.fullmatch(r"speed-up: \d+\.\d\dx", out[-1])
    assert float(out[-1].split()[1][:-1]) > 1.0


def test_the_gpu_smoke_skips_without_a_gpu_and_dry_runs_on_tiny_models():
    assert "no CUDA GPU here; skipping" in run("benchmarks/gpu_smoke.py")
    out = run(
        "benchmarks/gpu_smoke.py",
        "--supervisors",
        "tiny-sd,tiny-flux",
        "--device",
        "cpu",
        "--models",
        "tiny-janus,tiny-lumina",
        "--steps",
        "1",
        "--images",
        "2",
    )
    rows = [line for line in out.splitlines() if line.startswith("| tiny-")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| tiny-janus",
        "| tiny-lumina",
        "| tiny-sd",
        "| tiny-flux",
    ]
    assert "| tiny-flux | " in out and "(64 px) | 10 steps, guidance 3.5 |" in out
    assert (
        "8 x 274 tokens (micro-batch 4)" in out
    )  # tiny-lumina: 16 rows of 16 codes + end-of-line, 2 end tokens
    checks = [json.loads(line) for line in out.splitlines() if line.startswith('{"check"')]
    assert [c["fast_equals_reference"] for c in checks] == [1.0, 1.0]
    assert all(c["finite"] and c["padded_loss_error"] < 1e-4 for c in checks)


def test_the_proxy_batching_benchmark_prints_its_ratio():
    out = (
        run("benchmarks/proxy_batching.py", "--images", "4", "--batch", "2", "--steps", "2")
        .strip()
        .splitlines()
    )
    assert re.fullmatch(r"speed-up: \d+\.\d\dx", out[-1])


def test_the_evaluation_benchmark_scores_the_same_both_ways_and_prints_its_ratio():
    out = run("benchmarks/evaluation.py", "--images", "6", "--photos", "2").strip().splitlines()
    gap = float(next(line for line in out if line.startswith("largest score difference")).split()[-1])
    assert gap <= 1e-4
    assert re.fullmatch(r"speed-up: \d+\.\d\dx", out[-1])
