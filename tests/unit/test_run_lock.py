"""Two lmforge processes never train the same run directory at once."""

import pytest

from lmforge.errors import UserError
from lmforge.run import run_lock


def test_a_second_holder_of_a_run_is_refused_and_the_lock_is_released(tmp_path):
    refused = pytest.raises(UserError, match=r"is being trained by lmforge \(pid \d+\) right now")
    # the inner lock opens the file again: another open file description, as another process's
    with run_lock(tmp_path), refused, run_lock(tmp_path):
        pass
    with run_lock(tmp_path):  # released when the first run ended
        pass
