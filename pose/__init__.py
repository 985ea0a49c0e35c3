"""Driving videos and images to skeletons and skeleton images."""

from svd_common.errors import InputError

from .skeleton import PoseSequence

__all__ = ["InputError", "PoseSequence"]
