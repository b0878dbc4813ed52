"""KFP components of the Proxy-Tuning pipeline (see `components.stages`)."""

from components.stages import (
    evaluate,
    generate_proxy,
    ingest,
    merge_proxy,
    plan,
    proxy_shards,
    register,
    tune_student,
    tune_supervisor,
)

__all__ = [
    "evaluate",
    "generate_proxy",
    "ingest",
    "merge_proxy",
    "plan",
    "proxy_shards",
    "register",
    "tune_student",
    "tune_supervisor",
]
