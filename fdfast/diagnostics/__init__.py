"""Diagnostics of why FD works: attention distance, head diversity, attention maps, loss landscape.

Library API (the CLI is ``fdfast diagnose``, in ``command.py``)::

    from fdfast.diagnostics import capture_attention, attention_distance, head_similarity, landscape_1d
    out, maps = capture_attention(model, images)          # one AttentionMaps per layer
    px = attention_distance(maps[-1].weights, maps[-1].grid, maps[-1].patch_size, maps[-1].num_prefix_tokens)
    curve = landscape_1d(model, cross_entropy_loss(images, labels))   # or fd_loss(...), any loss(model)
    diagnose([load_model_under_test("runs/demo")], image_paths, "out/")  # what the CLI writes
"""
from fdfast.diagnostics.attention import (AttentionCapture, AttentionMaps, attention_distance, attention_modules,
                                          capture_attention, distance_spread, head_similarity,
                                          head_similarity_matrix, patch_distances)
from fdfast.diagnostics.landscape import (cross_entropy_loss, curvature_1d, evaluate_slice, fd_loss,
                                          filter_normalized_direction, landscape_1d, landscape_2d,
                                          representation_drift_loss)
from fdfast.diagnostics.inputs import ModelUnderTest, load_model_under_test
from fdfast.diagnostics.run import attention_statistics, diagnose

__all__ = ["AttentionCapture", "AttentionMaps", "attention_distance", "attention_modules", "capture_attention",
           "distance_spread", "head_similarity", "head_similarity_matrix", "patch_distances", "cross_entropy_loss",
           "curvature_1d", "evaluate_slice", "fd_loss", "filter_normalized_direction", "landscape_1d",
           "landscape_2d", "representation_drift_loss", "ModelUnderTest", "load_model_under_test",
           "attention_statistics", "diagnose"]
