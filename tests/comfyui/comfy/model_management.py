"""Stand-in for ComfyUI's `comfy/model_management.py` (Comfy-Org/ComfyUI 0.38.1, commit 02b2b38): the device, the
memory manager and the interrupt flag, with the real signatures; the interrupt code as ComfyUI's (the check
resets the flag, then raises). `unloaded` (not in ComfyUI) counts the unload calls for tests."""

from __future__ import annotations

import threading

import torch

unloaded = 0


class InterruptProcessingException(BaseException):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def get_torch_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def get_free_memory(dev=None, torch_free_too=False):
    import psutil

    free = psutil.virtual_memory().available
    return (free, free) if torch_free_too else free


def unload_all_models():
    global unloaded
    unloaded += 1


def soft_empty_cache(force=False):
    pass


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()
