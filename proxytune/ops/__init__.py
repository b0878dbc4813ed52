"""Operating the platform, callable without the CLI (from CI scripts or a notebook): local runs
through `kfp.local` under a supervising runner, DreamBench-wide runs, run configs, Kubeflow
uploads, runs and schedules, and garbage collection. The only library layer that imports KFP
and the `components`/`pipelines` packages; it may import every layer below it."""
