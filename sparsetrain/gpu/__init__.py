"""Where the sparse layers' GEMMs run on a GPU, apart from the math that decides what they compute.

backends/         the 2:4 backends (masked dense, cuSPARSELt) and which one a layer runs, and why
kernels/          Triton kernels (prune + compress in the sm90 layout, block-sparse matmuls), the cuSPARSELt plan cache
layout_sm90.py    cuSPARSELt's sm90 compressed layout in pure torch, the reference of the prune kernel
ops.py            opaque GPU calls as torch.library custom ops, so torch.compile traces around them
choice_cache.py   choices measured on this machine (cuSPARSELt algorithms, kernel configurations)
"""
