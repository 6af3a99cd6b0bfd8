"""`python -m moeut ...` (and `torchrun -m moeut train ...`)."""
import sys

from .cli import main

sys.exit(main())
