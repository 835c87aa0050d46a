"""Test helper (not collected): `python tests/fault_runner.py FAULT_JSON ARGS...` runs `python -m har_ref
ARGS...` with one fault injected, so tests/test_faults.py can kill a training process at an exact point:

    {"kill_after_micro": N}               SIGKILL right after micro-batch N (and its checkpoint, if due)
    {"kill_in_save_at_micro": N}          SIGKILL half-way through writing the checkpoint of micro-batch N
    {"kill_between_renames_at_micro": N}  SIGKILL between the two renames that swap in that checkpoint
    {"kill_in_cleanup_at_micro": N}       SIGKILL half-way through removing checkpoint.old after that save
    {"sigint_at_micro": N}                SIGINT (Ctrl-C) during micro-batch N
    {}                                    no fault
"""
import json
import os
import shutil
import signal
import sys

import torch

torch.set_num_threads(1)  # the same arithmetic in every process (tests/test_faults.py compares bytes)

from har_ref.__main__ import main  # noqa: E402
import har_ref.train.loop as loop  # noqa: E402

fault = json.loads(sys.argv[1])
current = {"micro": 0}


def kill(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)


after_micro_batch = loop.after_micro_batch


def faulty_after_micro_batch(run, state):
    current["micro"] = state.micro_step
    if fault.get("sigint_at_micro") == state.micro_step:
        kill(signal.SIGINT)  # as if the user pressed Ctrl-C while this micro-batch ran
    after_micro_batch(run, state)
    if fault.get("kill_after_micro") == state.micro_step:
        kill()


real_save, real_replace, real_rmtree = torch.save, os.replace, shutil.rmtree


def faulty_save(obj, f, *args, **kwargs):
    if fault.get("kill_in_save_at_micro") == current["micro"]:
        with open(f, "wb") as handle:  # a torn write: the first bytes of the file, then death
            handle.write(b"PK\x03\x04 half a checkpoint")
            handle.flush()
        kill()
    real_save(obj, f, *args, **kwargs)


def faulty_replace(src, dst):
    if str(src).endswith("checkpoint.tmp") and fault.get("kill_between_renames_at_micro") == current["micro"]:
        kill()
    real_replace(src, dst)


def faulty_rmtree(path, *args, **kwargs):
    files = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if str(path).endswith("checkpoint.old") and files and fault.get("kill_in_cleanup_at_micro") == current["micro"]:
        os.remove(os.path.join(path, files[0]))  # one file gone, the rest still there
        kill()
    real_rmtree(path, *args, **kwargs)


loop.after_micro_batch = faulty_after_micro_batch
torch.save, os.replace, shutil.rmtree = faulty_save, faulty_replace, faulty_rmtree
sys.exit(main(sys.argv[2:]))
