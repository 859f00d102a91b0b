"""``python -m genlab VERB ...``: what torchrun starts (``torchrun --nproc_per_node=N -m genlab train ...``)."""

import sys

from genlab.cli import main

sys.exit(main())
