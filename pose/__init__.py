"""Driving videos and images to skeletons and skeleton images."""

from .errors import InputError
from .skeleton import PoseSequence

__all__ = ["InputError", "PoseSequence"]
