"""The foundation every layer stands on: run parameters and presets, artifact contracts, the
object store, MLflow tracking, weight staging, images, prompts, sampling settings and the
backend registries. It imports the standard library and third-party packages only: no other
proxytune subpackage."""
