import pytest

from rat_plugins.engine.schedule import epoch_schedule


@pytest.mark.parametrize(
    "batch, epochs, expected", [(8, 100, 15900), (16, 100, 8000), (32, 100, 4000), (8, 150, 23850), (8, 200, 31800)]
)
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
    # runs too short for two decays keep what fits, and one learning-rate value per phase
    assert epoch_schedule(2, 1, 1).milestones == (1,) and epoch_schedule(2, 1, 1).lr_factors == (1.0, 0.1)
    assert epoch_schedule(1, 1, 1).milestones == () and epoch_schedule(1, 1, 1).lr_factors == (1.0,)


def _schedule_config(batch):
    from omegaconf import OmegaConf

    from rat_plugins.detectron2.schedule import multistep_with_warmup

    cfg = OmegaConf.create(
        dict(train=dict(checkpointer=dict(period=0)), dataloader=dict(train=dict(total_batch_size=batch)))
    )
    return cfg.train, multistep_with_warmup(), cfg.dataloader


def test_very_short_runs_build_a_valid_detectron2_scheduler():
    from detectron2.config import instantiate

    from rat_plugins.detectron2.schedule import set_epoch_schedule

    for max_iter in (1, 2, 3, 10):
        sched = epoch_schedule(max_iter, 1, 1, warmup_iters=0)
        train, lr, dataloader = _schedule_config(batch=1)
        set_epoch_schedule(train, lr, dataloader, epochs=1, num_images=max_iter, warmup_iters=0)
        assert lr.scheduler.milestones == list(sched.milestones)
        multiplier = instantiate(lr)
        assert multiplier(0.99) == pytest.approx(0.1 ** len(sched.milestones))


def test_epoch_schedule_written_into_a_config_and_recomputed():
    from rat_plugins.detectron2.schedule import set_epoch_schedule

    train, lr, dataloader = _schedule_config(batch=8)
    set_epoch_schedule(train, lr, dataloader, epochs=100, num_images=1271)
    assert (train.max_iter, train.eval_period, train.checkpointer.period) == (15900, 159, 159)
    assert (train.epochs, train.num_train_images, train.warmup_iters) == (100, 1271, 500)
    assert lr.scheduler.milestones == [11130, 14310] and lr.scheduler.num_updates == 15900
    assert lr.warmup_length == pytest.approx(500 / 15900)
    # a new batch (an override): the stored epochs and image count give the new schedule
    dataloader.train.total_batch_size = 16
    set_epoch_schedule(train, lr, dataloader)
    assert (train.max_iter, train.eval_period) == (8000, 80)
    assert lr.scheduler.milestones == [5600, 7200]


def test_checkpoints_once_an_epoch_or_every_few_hundred_iterations():
    from rat_plugins.engine.schedule import MAX_CHECKPOINT_PERIOD

    assert epoch_schedule(1271, 8, 100).checkpoint_period == 159  # an OFAT epoch
    long_epoch = epoch_schedule(118_287, 16, 12)  # COCO at batch 16: 7393 iterations an epoch
    assert long_epoch.iters_per_epoch == 7393 and long_epoch.checkpoint_period == MAX_CHECKPOINT_PERIOD == 500
    assert epoch_schedule(3, 8, 1).checkpoint_period == 1


def test_explicit_length_keys_that_contradict_the_epochs_are_refused():
    from rat_plugins.detectron2.schedule import set_epoch_schedule
    from rat_plugins.utils.config_keys import ConfigError

    train, lr, dataloader = _schedule_config(batch=8)
    set_epoch_schedule(train, lr, dataloader, epochs=100, num_images=1271)
    train.max_iter = 50  # what the override train.max_iter=50 leaves in the config
    with pytest.raises(
        ConfigError, match=r"train\.max_iter=50 contradicts .*train\.epochs=100.* Override train\.epochs"
    ):
        set_epoch_schedule(train, lr, dataloader, explicit=["train.max_iter"])
    train.max_iter = 15900  # the value the epochs give is no conflict
    set_epoch_schedule(train, lr, dataloader, explicit=["train.max_iter"])
    lr.scheduler.milestones = [10, 20]
    with pytest.raises(ConfigError, match=r"lr_multiplier\.scheduler\.milestones=\[10,20\] contradicts"):
        set_epoch_schedule(train, lr, dataloader, explicit=["lr_multiplier.scheduler.milestones"])
    lr.warmup_length = 0.5
    with pytest.raises(ConfigError, match=r"Override train\.warmup_iters instead"):
        set_epoch_schedule(train, lr, dataloader, explicit=["lr_multiplier.warmup_length"])
    # not given explicitly: derived values are recomputed as before
    assert set_epoch_schedule(train, lr, dataloader) == []
    assert lr.scheduler.milestones == [11130, 14310] and lr.warmup_length == pytest.approx(500 / 15900)


def test_explicit_periods_are_kept_and_reported():
    from rat_plugins.detectron2.schedule import set_epoch_schedule

    train, lr, dataloader = _schedule_config(batch=8)
    set_epoch_schedule(train, lr, dataloader, epochs=100, num_images=1271)
    train.eval_period, train.checkpointer.period = 1000, 50
    dataloader.train.total_batch_size = 16
    notes = set_epoch_schedule(train, lr, dataloader, explicit=["train.eval_period", "train.checkpointer.period"])
    assert (train.max_iter, train.eval_period, train.checkpointer.period) == (8000, 1000, 50)
    assert notes == [
        "train.eval_period=1000 given explicitly: kept (the epoch schedule would set 80)",
        "train.checkpointer.period=50 given explicitly: kept (the epoch schedule would set 80)",
    ]
