"""One logging setup: timestamped lines; with several ranks each says whose it is (warnings included)."""

import logging
import re
import warnings

import pytest

from msmoe_dist import logs

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture
def restore_logging():
    yield
    for logger in (logs.LOGGER, logging.getLogger("py.warnings")):  # ours only: pytest adds its own handlers too
        logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, logs._StderrHandler)]
    logging.captureWarnings(False)


def test_status_lines_and_warnings_carry_time_and_rank(restore_logging, capsys):
    logs.setup_logging(3, 4)
    logs.setup_logging(3, 4)  # idempotent: one handler, one prefix
    logs.info("msmoe-train: resuming from step 2")
    warnings.warn("slow path", UserWarning, stacklevel=1)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(STAMP + r" \[rank 3\] msmoe-train: resuming from step 2", lines[0]), lines
    assert re.match(STAMP + r" \[rank 3\] .*UserWarning: slow path", lines[1]), lines
    assert sum("[rank" in line for line in lines) == 2


def test_one_process_lines_have_no_rank_prefix(restore_logging, capsys):
    logs.setup_logging(0, 1)
    logs.info("msmoe-train: banner")
    assert re.fullmatch(STAMP + r" msmoe-train: banner", capsys.readouterr().err.strip())
