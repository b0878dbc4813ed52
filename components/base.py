"""The container image every component runs in (images/Dockerfile: CUDA PyTorch + proxytune).

Override at compile time with `PROXYTUNE_IMAGE=registry/proxytune:tag proxytune compile ...`.
"""

import os

BASE_IMAGE = os.environ.get("PROXYTUNE_IMAGE", "ghcr.io/proxytune/proxytune:0.2.0")
