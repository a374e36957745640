"""``python -m spikingformer`` (and ``torchrun -m spikingformer train ...``)."""

import sys

from spikingformer.cli import main

sys.exit(main())
