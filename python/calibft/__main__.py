"""``python -m calibft ...`` (also ``accelerate launch -m calibft train ...``)."""

import sys

from calibft.cli import main

sys.exit(main())
