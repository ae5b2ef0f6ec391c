"""The demo plugin's entry point: registers the demo teachers and data sources in the library's registries.

Exposed in pyproject.toml as ``[project.entry-points."fdfast.plugins"] demo = "fdfast.demo.register:register"``;
``fdfast.plugins.load_plugins()`` calls ``register()`` once, before the first registry lookup.
"""
from __future__ import annotations

from fdfast.data.sources import register_source
from fdfast.demo.common import DEMO_MEAN, DEMO_STD
from fdfast.demo.dinov2_onnx import DINOV2_S14_TIMM, dinov2_s14_weights
from fdfast.demo.efficientnet import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    EFFICIENTNET_LITE0_TIMM,
    efficientnet_lite0_weights,
)
from fdfast.demo.photos import demo_image_dir


def register() -> None:
    _register_sources()
    _register_teachers()


def _register_sources() -> None:
    register_source("demo-images", demo_image_dir,
                    "real photos scikit-image ships offline, as RGB JPEGs in one flat folder (data.path=None reads it)")
    # demo-labelled: the labelled ImageFolder set (fdfast/demo/labelled.py registers it here, one line below)
    # >>> demo-labelled registration
    from fdfast.demo.labelled import HELP, demo_labelled_dir
    register_source("demo-labelled", demo_labelled_dir, HELP)
    # <<< demo-labelled registration


def _register_teachers() -> None:
    from fdfast.models.teachers import TeacherEntry, register_teacher

    # The cached files hold timm keys already (the default filter_timm fits); 224 px like the ONNX graph.
    name, kwargs = DINOV2_S14_TIMM
    register_teacher(TeacherEntry(
        name="demo-dinov2-s14", timm_name=name, img_size=224, mean=DEMO_MEAN, std=DEMO_STD,
        timm_kwargs=dict(kwargs), tokens="final_norm", release_file="fdfast.demo.dinov2_s14_weights()",
        default_weights=dinov2_s14_weights))
    name, kwargs = EFFICIENTNET_LITE0_TIMM
    register_teacher(TeacherEntry(
        name="demo-efficientnet-lite0", timm_name=name, img_size=224, mean=EFFICIENTNET_LITE0_MEAN,
        std=EFFICIENTNET_LITE0_STD, timm_kwargs=dict(kwargs), tokens="last_stage",  # the last stage's map
        release_file="fdfast.demo.efficientnet_lite0_weights()", default_weights=efficientnet_lite0_weights,
        embedding_dim=1000))  # its ImageNet classifier: loss.target=embedding distills the logits
