"""The training step queues its work without waiting for the device: no host synchronisation in a steady-state step
that does not log, checkpoint or sample. Counted under a dispatch mode that sees every aten operation of the loop:
reading a tensor's value on the host (`_local_scalar_dense`, what .item() and float() call) and device-to-host
copies. The optimizer's step counters are host tensors by design (torch keeps them on the CPU unless the optimizer is
fused or capturable), so reading them waits for nothing; every other read counts."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from training_helpers import train_cli, write_images

aten = torch.ops.aten


class HostReads(TorchDispatchMode):
    """Records, per training step, the operations that would make the host wait for the device. Values that never
    were on a device are exempt: the optimizer's step counters (`exempt`) and numbers drawn from a CPU generator on a
    CPU tensor (the data loader draws its workers' seed so at each epoch's start)."""

    def __init__(self, exempt):
        super().__init__()
        self.exempt, self.step, self.reads, self.host_drawn = exempt, 0, Counter(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            if args[0].data_ptr() not in self.exempt() | self.host_drawn:
                self.reads[self.step] += 1
        elif func is aten._to_copy.default and args[0].device.type != "cpu" and str(kwargs.get("device", "")) == "cpu":
            self.reads[self.step] += 1
        elif func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.reads[self.step] += 1
        result = func(*args, **kwargs)
        if func in (aten.random_.default, getattr(aten.random_, "from"), aten.random_.to) and args[0].device.type == "cpu":
            self.host_drawn.add(args[0].data_ptr())
        return result


@pytest.mark.parametrize("formulation", ["ddpm", pytest.param("edm", marks=pytest.mark.heavy)])  # the mode slows every op
def test_steps_that_do_not_log_checkpoint_or_sample_read_nothing_back(tiny_sdxl_path, tmp_path, capsys, monkeypatch, formulation):
    import train_lora
    from common.progress import CtrlC, Progress

    made = {}
    make_optimizer = train_lora.make_optimizer

    def optimizer_and_rest(*args, **kwargs):
        result = make_optimizer(*args, **kwargs)
        made["optimizer"] = result[0]
        return result

    monkeypatch.setattr(train_lora, "make_optimizer", optimizer_and_rest)

    def step_counters():
        optimizer = made["optimizer"]
        return {state["step"].data_ptr() for state in optimizer.state.values() if torch.is_tensor(state.get("step"))}

    mode = HostReads(step_counters)
    enter, leave, update = CtrlC.__enter__, CtrlC.__exit__, Progress.update

    def enter_loop(self):  # the loop runs inside CtrlC's block: count there, and only there
        mode.__enter__()
        return enter(self)

    def leave_loop(self, *exc):
        leave(self, *exc)
        mode.__exit__(None, None, None)

    def next_step(self, *args):
        update(self, *args)
        mode.step += 1  # what follows belongs to the next step

    monkeypatch.setattr(CtrlC, "__enter__", enter_loop)
    monkeypatch.setattr(CtrlC, "__exit__", leave_loop)
    monkeypatch.setattr(Progress, "update", next_step)
    extra = ["--edm", "--min_timestep", 100] if formulation == "edm" else ["--snr_gamma", 5]
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 2),
                             "--instance_prompt", "a sks dog", "--resolution", 64, "--train_batch_size", 1, "--cache_latents",
                             "--max_train_steps", 9, "--logging_steps", 4, "--checkpointing_steps", 6, "--output_dir",
                             tmp_path / "out", *extra)
    assert code == 0, err
    # steps are numbered from 0 here: step s ends with Progress.update, which reads the loss at steps 4 and 8 (s 3, 7)
    # and the checkpoint at step 6 (s 5) and the last, 9 (s 8), save what they read
    quiet = {s: mode.reads[s] for s in range(9) if s not in (3, 5, 7, 8)}
    assert quiet == dict.fromkeys(quiet, 0), f"host reads in steady-state steps: {dict(mode.reads)}"
    assert mode.reads[3] >= 1 and mode.reads[7] >= 1  # the dispatch mode does see the loss being read
