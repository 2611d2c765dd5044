"""Running a bench study's ``main`` inside the test process."""

import torch


def run_main(main, argv):
    """``main(argv)``, leaving torch's global settings (threads, deterministic algorithms) as they were."""
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
