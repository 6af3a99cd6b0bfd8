"""The operators the model is built from, one per file, each with its contract, its plain-PyTorch
form and its autograd:

    dispatch.py        `use_fused`: whether a call takes the Triton kernel or the PyTorch form
    grouped_mm.py      the grouped matmul over expert segments (gather, gate scale, scatter), its weight
                       gradient, the row dot and the top-k sum: the primitives of every MoE projection
    expert_mm.py       routing (`route`) and the MoE projections with their backward passes
    expert_mlp.py      the σ-MoE FFN's whole expert MLP (up, ReLU, down, gate, top-k sum) in one Function
    expert_gemv.py     the decode-time form of a projection (a few rows: one matrix-vector product each)
    shared_weights.py  gradient sinks that sum a shared weight's gradients over its applications
    router.py          sigmoid top-k and the router's probability sums (the entropy regulariser)
    norm.py            LayerNorm
    rope.py            rotary position embeddings
    cast_relay.py      lends a bf16 copy of a tensor from the pass that made it to the pass that needs it
    reference.py       the ground truths: the naive forms every test compares the fast paths with

Shape suffixes follow the package legend in `moeut/__init__.py`.
The Triton kernels live in `moeut/kernels/`, which imports nothing from here.
"""
