"""The paper's configurations, importable as a top-level `profiles` module like the official release's
(`import profiles; MoEUTLM(vocab, **profiles.MoEUT_244M)`). The definitions live in moeut/profiles.py."""

from moeut.profiles import *  # noqa: F403
from moeut.profiles import MoEUT_44M, MoEUT_126M, MoEUT_244M, MoEUT_318M, MoEUT_727M, MoEUT_1B  # noqa: F401
