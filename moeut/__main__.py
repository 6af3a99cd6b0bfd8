"""`python -m moeut ...` (and `torchrun -m moeut train ...`)."""

import sys

from moeut.cli import main

sys.exit(main())
