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


def tiny_study(main, tmp_path_factory, name: str):
    """A study's ``--tiny`` run into a fresh folder: the folder and the report."""
    out = tmp_path_factory.mktemp(name)
    return out, run_main(main, ["--tiny", "--out", str(out)])
