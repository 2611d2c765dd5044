"""Teardown shared by the tests' spawned gloo workers."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def leave() -> None:
    """Meet the other ranks, destroy the process group and end this worker without finalizing Python.

    Leaving together keeps a rank from tearing the group down while another
    still uses it. Ending with ``os._exit`` avoids a race in torch's gloo
    backend (seen on torch 2.13 in about 1 exit in 8, from a core dump): a DTensor or
    device mesh still holds the process group after ``destroy_process_group``,
    so its worker thread lives on, and when it drops a finished barrier it
    releases the tensors of the all-reduce before it, which needs the GIL. If
    the main thread is finalizing Python by then, taking the GIL ends the
    thread inside a C++ destructor and the process aborts ("terminate called
    without an active exception"). The worker's results are written before
    this call, so skipping finalization loses nothing.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
