"""The pipeline's stages as plain functions: ingest, supervisor tuning, proxy generation (and
import, and filtering), student tuning, the direct baseline, evaluation and registration, and
`steps`, the one face the KFP components call. It imports `core`, `backends`, `analysis` and
`serving`; never KFP, the CLI or the operations in `ops`."""
