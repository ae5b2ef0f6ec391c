"""Functional API: the fused FD loss and the shared-bias attention, each with a ``backend=`` switch."""
from fdfast.kernels.fd_loss import fd_loss
from fdfast.kernels.rpb_attention import rpb_attention

__all__ = ["fd_loss", "rpb_attention"]
