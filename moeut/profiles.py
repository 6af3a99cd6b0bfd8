"""Model configurations: the paper's MoEUT models, its parameter-matched dense baselines, and tiny
presets for CPU demos and tests. Use as `MoEUTLM(n_tokens, **MoEUT_244M)`.

Differences from the official `profiles.py`: `MoEUT_727M` has d_model 1280 (the paper's 727M model,
training sweep c4_moeut_gigantic_switchead); the official file's 1024 is a typo that gives 582M
parameters. `MoEUT_44M`'s odd rotary width (41 of d_head 82) works here (rounded down to 40 as in the
paper's training code); the official release crashed on it.
"""

MoEUT_44M = dict(
    d_model=412, n_layers=16, n_heads=4, ff_n_experts=155, att_n_experts=8, d_head=82, ff_k=12, group_size=2
)

MoEUT_126M = dict(
    d_model=768, n_layers=18, n_heads=4, ff_n_experts=254, att_n_experts=10, d_head=96, ff_k=12, group_size=2
)

MoEUT_244M = dict(
    d_model=1024, n_layers=18, n_heads=4, ff_n_experts=387, att_n_experts=10, d_head=128, ff_k=16, group_size=2
)

MoEUT_318M = dict(
    d_model=1024, n_layers=24, n_heads=4, ff_n_experts=338, att_n_experts=10, d_head=128, ff_k=16, group_size=3
)

MoEUT_727M = dict(
    d_model=1280, n_layers=36, n_heads=5, ff_n_experts=467, att_n_experts=13, d_head=128, ff_k=20, group_size=4
)

MoEUT_1B = dict(
    d_model=1536, n_layers=36, n_heads=6, ff_n_experts=565, att_n_experts=12, d_head=128, ff_k=24, group_size=4
)

# A few hundred thousand parameters: CPU demos, CI, quick experiments.
MoEUT_tiny = dict(
    d_model=128,
    n_layers=4,
    n_heads=4,
    ff_n_experts=32,
    att_n_experts=4,
    d_head=32,
    ff_k=4,
    group_size=2,
    ff_expert_size=32,
)

# The paper's dense baselines (pre-LN, RoPE, ReLU FFN), parameter-matched to the MoEUT models.
Dense_44M = dict(d_model=412, n_layers=16, n_heads=10, d_head=41, d_ff=2053)
Dense_126M = dict(d_model=768, n_layers=16, n_heads=16, d_ff=3072)
Dense_244M = dict(d_model=1024, n_layers=18, n_heads=16, d_ff=4110)
Dense_319M = dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4110)
Dense_728M = dict(d_model=1280, n_layers=36, n_heads=20, d_ff=5120)
Dense_1B = dict(d_model=1536, n_layers=36, n_heads=24, d_ff=6144)
Dense_tiny = dict(d_model=128, n_layers=4, n_heads=4, d_ff=512)

MOEUT_PROFILES = {
    "44M": MoEUT_44M,
    "126M": MoEUT_126M,
    "244M": MoEUT_244M,
    "318M": MoEUT_318M,
    "727M": MoEUT_727M,
    "1B": MoEUT_1B,
    "tiny": MoEUT_tiny,
}
DENSE_PROFILES = {
    "44M": Dense_44M,
    "126M": Dense_126M,
    "244M": Dense_244M,
    "319M": Dense_319M,
    "728M": Dense_728M,
    "1B": Dense_1B,
    "tiny": Dense_tiny,
}


def model_names():
    """Names accepted by `moeut train --model`: moeut-244M, dense-244M, moeut-tiny, ..."""
    return [f"moeut-{k}" for k in MOEUT_PROFILES] + [f"dense-{k}" for k in DENSE_PROFILES]
