"""Test-time augmentation: transforms, views, tasks, merges, uncertainty, the Lightning callback and the wrapper."""

from ttc_lightning.tta.tasks import TASKS, Boxes, Classification, Keypoints, Segmentation, Task
from ttc_lightning.tta.views import View, expand_views

__all__ = ["TASKS", "Boxes", "Classification", "Keypoints", "Segmentation", "Task", "View", "expand_views"]
