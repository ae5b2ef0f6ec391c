"""fdfast.kernels: the fused FD loss and the shared-bias flash attention (Triton), with their
plain-PyTorch specification in ``reference``. Installed as ``fdfast.kernels`` (see setup.py)."""
