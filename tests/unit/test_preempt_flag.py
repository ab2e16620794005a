"""The preemption stop flag: set by SIGTERM/SIGUSR1 only while installed; ranks agree through one all-reduce."""

import os
import signal

from msmoe_dist.train.loop import StopFlag


def test_signal_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with StopFlag() as stop:
        assert not stop.agreed(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.raised and stop.agreed(1)  # one process: no collective
    assert signal.getsignal(signal.SIGUSR1) is before


def _one_rank_signalled(rank, world_size):
    stop = StopFlag()
    first = stop.agreed(world_size)
    stop.raised = rank == 1  # the signal reached rank 1 only
    return first, stop.agreed(world_size)


def test_ranks_agree_when_one_was_signalled(run_distributed):
    assert run_distributed(_one_rank_signalled, 2) == [(False, True), (False, True)]
