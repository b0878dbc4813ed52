"""Model backends, one module per family; each registers its names on import, into the
registries of `proxytune.core.registry`, which finds these modules by scanning this package.

Modules starting with `_` hold shared pieces and register nothing: `_base` (what each kind
provides), `_ar` (the AR students' core), `_diffusion` (the supervisors' core),
`_checkpoints` (published configs, checked loading), `_tuned` (a tuned model back from its
artifact folder), `_vqgan`, `_tokenizers`. It imports `core` only.
"""
