"""engine/build.py: training order, data root, AMP settings."""
import pytest
import torch

from engine.build import amp_settings, build_scaler, make_train_sampler, prepare_data_root
from engine.config import config_from_dict
from engine.data import load_split
from engine.errors import RunError


def test_train_sampler_order_is_fixed_per_epoch_and_skippable():
    data = list(range(10))
    order = list(make_train_sampler(data, seed=3, epoch=1))
    assert sorted(order) == data and order == list(make_train_sampler(data, seed=3, epoch=1))
    assert order != list(make_train_sampler(data, seed=3, epoch=2))
    skipped = make_train_sampler(data, seed=3, epoch=1, skip=4)
    assert list(skipped) == order[4:] and len(skipped) == 6


def test_missing_data_root_is_generated_or_refused(tmp_path):
    cfg = config_from_dict({"data": {"root": str(tmp_path / "synth"), "generate_if_missing": True,
                                     "synth": {"train": 2, "valid": 1, "test": 1, "width": 96, "height": 64}}})
    root = prepare_data_root(cfg)
    assert root == tmp_path / "synth" and len(load_split(root, "train").images) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # generated aside, then renamed into place
    cfg.data.root, cfg.data.generate_if_missing = str(tmp_path / "nowhere"), False
    with pytest.raises(RunError, match="nowhere: dataset root not found"):
        prepare_data_root(cfg)


def test_amp_settings_auto_keeps_the_recipe_and_bfloat16_runs_anywhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def amp(device, **train):
        return amp_settings(config_from_dict({"train": train}).train, device)

    assert not amp(cpu).enabled and not amp(cpu, amp_dtype="bfloat16", amp=False).enabled  # auto: off on CPU
    on_cuda = amp(cuda)
    assert on_cuda.enabled and on_cuda.dtype == torch.float16 and on_cuda.scaled  # auto: fp16 + GradScaler
    for device in (cpu, cuda):
        bf16 = amp(device, amp_dtype="bfloat16")
        assert bf16.enabled and bf16.dtype == torch.bfloat16 and not bf16.scaled
    assert not build_scaler(amp(cpu, amp_dtype="bfloat16"), cpu).is_enabled()
    with pytest.raises(RunError, match="amp_dtype=float16 needs a CUDA device"):
        amp(cpu, amp_dtype="float16")
    with pytest.raises(ValueError, match="train.amp_dtype must be auto, float16 or bfloat16"):
        config_from_dict({"train": {"amp_dtype": "fp8"}})


def _slow_seed_worker(worker_id: int) -> None:
    import time

    from engine.build import seed_worker

    time.sleep(1.5)  # the window between the fork and seed_worker, made wide
    seed_worker(worker_id)


def test_stop_signal_during_worker_start_does_not_kill_the_worker():
    """A SIGTERM to the process group lands in a worker before its worker_init_fn ignores it."""
    import os
    import signal
    import time

    from torch.utils.data import DataLoader

    from engine.data import shut_down_loader_iterator, start_loader_iterator

    loader = DataLoader(list(range(4)), batch_size=2, num_workers=1, worker_init_fn=_slow_seed_worker)
    batches = start_loader_iterator(loader)
    try:
        time.sleep(0.3)  # the worker is up, still inside the slow init
        os.kill(batches._workers[0].pid, signal.SIGTERM)
        assert [b.tolist() for b in batches] == [[0, 1], [2, 3]]
        assert batches._workers[0].exitcode in (None, 0)
    finally:
        shut_down_loader_iterator(batches)
