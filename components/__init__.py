"""KFP components of the Proxy-Tuning pipeline (see `components.stages`)."""

from components.stages import (
    aggregate,
    evaluate,
    generate_proxy,
    ingest,
    merge_proxy,
    plan,
    plan_bench,
    proxy_shards,
    register,
    tune_direct,
    tune_student,
    tune_supervisor,
)

__all__ = [
    "aggregate",
    "evaluate",
    "generate_proxy",
    "ingest",
    "merge_proxy",
    "plan",
    "plan_bench",
    "proxy_shards",
    "register",
    "tune_direct",
    "tune_student",
    "tune_supervisor",
]
