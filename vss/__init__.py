"""vss: a plain-PyTorch reference implementation of the two winning PVUW 2024 video semantic
segmentation (VSPW) solutions: DVIS++ trained with Masked Video Consistency (2nd place) and
semi-supervised fine-tuning with unreliable pseudo labels (1st place).

Shape legend, used in every shape comment of the package:
    B clips, T frames, N = B*T images, Q queries, M targets, K classes (K+1 with "no object"),
    C channels, D hidden size, H x W pixels (h x w at stride 4), L tokens, P points.
"""
