import pytest

from rat_plugins.engine.schedule import epoch_schedule


@pytest.mark.parametrize("batch, epochs, expected", [(8, 100, 15900), (16, 100, 8000), (32, 100, 4000),
                                                     (8, 150, 23850), (8, 200, 31800)])
def test_ofat_iteration_counts(batch, epochs, expected):
    sched = epoch_schedule(1271, batch, epochs)
    assert sched.max_iter == expected
    assert sched.milestones == (round(0.7 * expected), round(0.9 * expected))
    assert sched.warmup_iters == 500


def test_schedule_rejects_empty_split():
    with pytest.raises(ValueError, match="0 images"):
        epoch_schedule(0, 8, 1)
    assert epoch_schedule(3, 8, 2).warmup_iters == 2  # warm-up capped at the run length


def test_short_schedules_keep_valid_milestones():
    for n in range(3, 12):
        m = epoch_schedule(n, 1, 1).milestones
        assert 0 < m[0] < m[1] < n, (n, m)
