"""GPU tests check correctness, not speed: one Triton config per kernel instead of autotuning
(autotuning compiles every config for every new shape, minutes over the whole module)."""

import os

os.environ.setdefault("MOEUT_AUTOTUNE", "0")
from moeut.settings import settings  # (moeut may already be imported by other test folders)

settings.autotune = os.environ["MOEUT_AUTOTUNE"] != "0"
