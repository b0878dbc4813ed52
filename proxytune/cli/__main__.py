"""`python -m proxytune.cli`: the `proxytune` command."""

import sys

from proxytune.cli import main

sys.exit(main())
