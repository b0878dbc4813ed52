"""KFP components of the Proxy-Tuning pipeline (see `components.stages`)."""

from components.stages import evaluate, generate_proxy, ingest, plan, register, tune_student, tune_supervisor

__all__ = ["evaluate", "generate_proxy", "ingest", "plan", "register", "tune_student", "tune_supervisor"]
