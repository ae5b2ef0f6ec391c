"""The values the kernels accept, defined once; fdfast.config's choice fields are built from them.

No imports: fdfast.config reads this module without loading torch or Triton.
"""
LOSS_BACKENDS = ("auto", "triton", "torch", "reference")  # fdfast.functional.fd_loss(backend=...), loss.backend
LOSS_KINDS = ("smooth_l1", "l2", "cosine")  # loss.kind
FUSED_LOSS_KINDS = ("smooth_l1", "l2")  # kinds with a fused Triton kernel; cosine runs on the torch path
ATTENTION_BACKENDS = ("auto", "triton", "reference", "sdpa")  # rpb_attention(backend=...), model.attention
