"""Students (BEiT-style ViT with a shared relative position bias; SwinV2), the teacher registry, converters."""
