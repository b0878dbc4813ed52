"""A tuned student in use: `generate` draws images from an adapter folder or a registered model,
and `model` is the MLflow pyfunc model every registered version serves through. It imports
`core` and `backends` only, so that registration (a stage) can log the served model."""
