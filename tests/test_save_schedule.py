"""Saving as kohya users compare epochs: the files kohya's sd-scripts writes and removes during a LoRA run, under its
names and in its precisions (common/save_schedule.py against tests/kohya_saving.py, a reproduction of kohya's loop)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.cli import UserError
from common.save_schedule import SAVE_PRECISIONS, SaveSchedule, cast_for_saving, epoch_file_name, final_file_name, step_file_name
from kohya_saving import kohya_run

NAME = "sks_dog"


def run_with_schedule(schedule: SaveSchedule, folder, *, steps_per_epoch: int, total_steps: int, start_step: int = 0, stop_step=None):
    """The ("write" | "remove", file name) events of a training loop shaped like train_lora's (optimizer steps counted
    from 1, an epoch's end after its last step or the run's), writing empty files into `folder`."""
    folder.mkdir(exist_ok=True)
    events = []

    def write(file_name):
        (folder / file_name).touch()
        events.append(("write", file_name))
        events.extend(("remove", path.name) for path in schedule.remove_expired(folder, file_name))

    num_epochs = math.ceil(total_steps / steps_per_epoch)
    step = start_step
    while step < total_steps:
        epoch = step // steps_per_epoch
        for _ in range(step - epoch * steps_per_epoch, steps_per_epoch):
            step += 1
            if file_name := schedule.file_after_step(step):
                write(file_name)
            if step in (total_steps, stop_step):
                break
        if step == stop_step:  # interrupted: a resumed run goes on from here
            return events
        if file_name := schedule.file_after_epoch(epoch + 1, num_epochs):
            write(file_name)
    write(schedule.final_name)
    return events


def files_in(folder) -> set[str]:
    return {path.name for path in folder.iterdir()}


def option_combinations():
    """(options, steps_per_epoch, total_steps) over every_n_epochs 1..3, steps every 1..10, last_n counts and spans
    (spans below, at and off multiples of every_n_steps), epochs of 1..7 steps and runs that end mid-epoch."""
    for every_e, every_s in itertools.product((None, 1, 2, 3), (None, 1, 3, 4, 10)):
        for last_e in (None, 1, 2, 3) if every_e else (None,):
            for last_s in (None, 1, 2, 5, 7, 12, 30) if every_s else (None,):
                for steps_per_epoch, total_steps in ((1, 1), (1, 9), (3, 10), (4, 24), (7, 40), (5, 23), (10, 3)):
                    options = dict(every_n_epochs=every_e, every_n_steps=every_s, last_n_epochs=last_e, last_n_steps=last_s)
                    yield options, steps_per_epoch, total_steps


def kohya_events(options, steps_per_epoch, total_steps, **resume):
    return kohya_run(
        output_name=NAME, steps_per_epoch=steps_per_epoch, max_train_steps=total_steps,
        **{f"save_{key}": value for key, value in options.items()}, **resume,
    )


def test_writes_and_removals_match_kohyas_loop_for_every_option_combination(tmp_path):
    checked = 0
    for index, (options, steps_per_epoch, total_steps) in enumerate(option_combinations()):
        folder = tmp_path / str(index)
        ours = run_with_schedule(SaveSchedule(name=NAME, **options).check(), folder, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        kohya, kohya_files = kohya_events(options, steps_per_epoch, total_steps)
        context = f"{options}, {steps_per_epoch} steps an epoch, {total_steps} steps"
        assert ours == kohya, f"{context}:\nours  {ours}\nkohya {kohya}"
        assert files_in(folder) == kohya_files, f"{context}: left {sorted(files_in(folder))}, kohya {sorted(kohya_files)}"
        checked += 1
    assert checked > 1000, f"only {checked} combinations"


# stopped after a step inside an epoch: one stopped at an epoch's last step resumes in the next epoch and never
# writes the file of the one it finished, in kohya (epoch_to_start = step // steps per epoch) as in train_lora
@pytest.mark.parametrize("stop_step", [1, 5, 10, 13, 22, 29])
def test_a_resumed_run_removes_the_files_of_the_run_it_continues(tmp_path, stop_step):
    options = dict(every_n_epochs=1, every_n_steps=3, last_n_epochs=2, last_n_steps=7)
    steps_per_epoch, total_steps = 4, 30
    first = run_with_schedule(SaveSchedule(name=NAME, **options), tmp_path, steps_per_epoch=steps_per_epoch,
                              total_steps=total_steps, stop_step=stop_step)
    resumed = run_with_schedule(SaveSchedule(name=NAME, **options), tmp_path, steps_per_epoch=steps_per_epoch,
                                total_steps=total_steps, start_step=stop_step)
    uninterrupted, kohya_files = kohya_events(options, steps_per_epoch, total_steps)
    assert first + resumed == uninterrupted, f"stopped at {stop_step}:\nours  {first} + {resumed}\nkohya {uninterrupted}"
    assert files_in(tmp_path) == kohya_files
    rest_only, _ = kohya_events(options, steps_per_epoch, total_steps, start_step=stop_step, present=frozenset(files_of(first)))
    assert resumed == rest_only, f"stopped at {stop_step}: resumed {resumed}, kohya's rest {rest_only}"


def files_of(events):
    present = set()
    for action, file_name in events:
        (present.add if action == "write" else present.discard)(file_name)
    return present


# ---------------------------------------------------------------- kohya's rules, case by case


def test_save_last_n_steps_is_a_span_of_steps_not_a_count(tmp_path):
    schedule = SaveSchedule(name=NAME, every_n_steps=10, last_n_steps=25)
    run_with_schedule(schedule, tmp_path, steps_per_epoch=100, total_steps=50)
    kept = sorted(files_in(tmp_path))
    assert kept == [f"{NAME}-step00000030.safetensors", f"{NAME}-step00000040.safetensors",
                    f"{NAME}-step00000050.safetensors", f"{NAME}.safetensors"], kept


def test_a_span_shorter_than_the_save_interval_keeps_only_the_newest_step_file():
    schedule = SaveSchedule(name=NAME, every_n_steps=10, last_n_steps=1)
    assert schedule.expired(step_file_name(NAME, 10)) == []
    assert schedule.expired(step_file_name(NAME, 20)) == [step_file_name(NAME, 10)]


def test_save_last_n_epochs_counts_saves_when_every_n_epochs_is_above_one(tmp_path):
    schedule = SaveSchedule(name=NAME, every_n_epochs=2, last_n_epochs=2)
    events = run_with_schedule(schedule, tmp_path, steps_per_epoch=1, total_steps=9)
    removals = [name for action, name in events if action == "remove"]
    assert removals == [epoch_file_name(NAME, 2), epoch_file_name(NAME, 4)], events
    assert sorted(files_in(tmp_path)) == [epoch_file_name(NAME, 6), epoch_file_name(NAME, 8), final_file_name(NAME)]


def test_the_last_epoch_writes_the_final_file_and_no_epoch_file(tmp_path):
    events = run_with_schedule(SaveSchedule(name=NAME, every_n_epochs=1), tmp_path, steps_per_epoch=2, total_steps=6)
    assert [name for _, name in events] == [epoch_file_name(NAME, 1), epoch_file_name(NAME, 2), final_file_name(NAME)]


def test_a_run_ending_mid_epoch_has_no_file_for_that_epoch():
    schedule = SaveSchedule(name=NAME, every_n_epochs=1)
    num_epochs = math.ceil(23 / 5)
    assert [schedule.file_after_epoch(epoch, num_epochs) for epoch in range(1, num_epochs + 1)] == [
        epoch_file_name(NAME, 1), epoch_file_name(NAME, 2), epoch_file_name(NAME, 3), epoch_file_name(NAME, 4), None]


def test_the_last_step_writes_a_step_file_beside_the_final_file(tmp_path):
    events = run_with_schedule(SaveSchedule(name=NAME, every_n_steps=5), tmp_path, steps_per_epoch=3, total_steps=10)
    assert [name for _, name in events] == [step_file_name(NAME, 5), step_file_name(NAME, 10), final_file_name(NAME)]


def test_the_final_file_never_expires_and_expires_nothing(tmp_path):
    schedule = SaveSchedule(name=NAME, every_n_epochs=1, every_n_steps=1, last_n_epochs=1, last_n_steps=1)
    run_with_schedule(schedule, tmp_path, steps_per_epoch=2, total_steps=8)
    assert final_file_name(NAME) in files_in(tmp_path)
    assert schedule.expired(final_file_name(NAME)) == []


def test_files_of_other_names_and_spellings_are_never_removed(tmp_path):
    schedule = SaveSchedule(name=NAME, every_n_steps=1, last_n_steps=1)
    strangers = ["other-step00000001.safetensors", f"{NAME}-step1.safetensors", f"{NAME}-step00000001.ckpt", f"{NAME}-000001.safetensors"]
    for file_name in strangers:
        (tmp_path / file_name).touch()
    (tmp_path / step_file_name(NAME, 1)).touch()
    removed = schedule.remove_expired(tmp_path, step_file_name(NAME, 3))
    assert [path.name for path in removed] == [step_file_name(NAME, 1)]
    assert files_in(tmp_path) == set(strangers)


# ---------------------------------------------------------------- names


def test_file_names_are_kohyas():
    assert epoch_file_name("sks", 4) == "sks-000004.safetensors"
    assert step_file_name("sks", 100) == "sks-step00000100.safetensors"
    assert final_file_name("sks") == "sks.safetensors"
    # kohya's {:06d} and {:08d} are minimum widths
    assert epoch_file_name("sks", 1234567) == "sks-1234567.safetensors"
    assert step_file_name("sks", 123456789) == "sks-step123456789.safetensors"


def test_numbered_reads_back_only_the_names_the_schedule_writes():
    schedule = SaveSchedule(name="my-lora")
    assert schedule.numbered("my-lora-000004.safetensors") == ("epoch", 4)
    assert schedule.numbered("my-lora-step00000100.safetensors") == ("step", 100)
    assert schedule.numbered("my-lora-1234567.safetensors") == ("epoch", 1234567)
    for other in ("my-lora.safetensors", "my-lora-4.safetensors", "my-lora-0000004.safetensors", "my-lora-step100.safetensors",
                  "my-lora-000004.ckpt", "your-lora-000004.safetensors", "my-lora-000000.safetensors", "my-lora-stepx.safetensors"):
        assert schedule.numbered(other) is None, other


def test_saved_files_lists_this_names_epoch_then_step_files_in_order(tmp_path):
    for file_name in ("a-step00000020.safetensors", "a-000010.safetensors", "a-000002.safetensors", "a-step00000003.safetensors",
                      "a.safetensors", "b-000001.safetensors", "a-000003.json"):
        (tmp_path / file_name).touch()
    (tmp_path / "a-000005.safetensors").mkdir()
    listed = [path.name for path in SaveSchedule(name="a").saved_files(tmp_path)]
    assert listed == ["a-000002.safetensors", "a-000010.safetensors", "a-step00000003.safetensors", "a-step00000020.safetensors"]
    assert SaveSchedule(name="a").saved_files(tmp_path / "missing") == []


# ---------------------------------------------------------------- precision


def stored_dtypes(state_dict, tmp_path) -> dict[str, torch.dtype]:
    file = tmp_path / "adapter.safetensors"
    save_file(state_dict, str(file))
    with safe_open(str(file), framework="pt") as handle:
        return {key: handle.get_tensor(key).dtype for key in handle.keys()}


@pytest.mark.parametrize("precision, dtype", [("float", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision_sets_the_stored_dtype_of_float_tensors(tmp_path, precision, dtype):
    state = {"lora_up.weight": torch.randn(4, 2, dtype=torch.bfloat16), "lora_down.weight": torch.randn(2, 4, dtype=torch.float16),
             "alpha": torch.tensor(8.0), "index": torch.arange(3), "mask": torch.tensor([True, False])}
    stored = stored_dtypes(cast_for_saving(state, precision), tmp_path)
    assert stored == {"lora_up.weight": dtype, "lora_down.weight": dtype, "alpha": dtype, "index": torch.int64, "mask": torch.bool}, stored


def test_without_save_precision_each_tensor_keeps_its_dtype(tmp_path):
    state = {"up": torch.randn(2, 2, dtype=torch.bfloat16), "down": torch.randn(2, 2)}
    assert stored_dtypes(cast_for_saving(state, None), tmp_path) == {"up": torch.bfloat16, "down": torch.float32}


def test_cast_values_are_the_rounded_originals():
    value = torch.tensor([1 / 3, 1e-3, 100.0])
    cast = cast_for_saving({"w": value}, "fp16")["w"]
    assert torch.equal(cast, value.half()), cast


def test_save_precisions_are_kohyas_three_names():
    assert sorted(SAVE_PRECISIONS) == ["bf16", "float", "fp16"]


def test_cast_for_saving_refuses_an_unknown_precision():
    with pytest.raises(UserError, match="--save_precision 'fp8': choose float, fp16, bf16"):
        cast_for_saving({"w": torch.zeros(1)}, "fp8")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("options, refusal", [
    (dict(every_n_epochs=0), "--save_every_n_epochs 0: a whole number >= 1"),
    (dict(every_n_steps=0), "--save_every_n_steps 0: a whole number >= 1"),
    (dict(every_n_epochs=-1), "--save_every_n_epochs -1: a whole number >= 1"),
    (dict(every_n_steps=-5), "--save_every_n_steps -5: a whole number >= 1"),
    (dict(every_n_epochs=1, last_n_epochs=0), "--save_last_n_epochs 0: a whole number >= 1"),
    (dict(every_n_epochs=1, last_n_epochs=-1), "--save_last_n_epochs -1: a whole number >= 1"),
    (dict(every_n_steps=10, last_n_steps=0), "--save_last_n_steps 0: a whole number >= 1"),
    (dict(every_n_steps=10, last_n_steps=-3), "--save_last_n_steps -3: a whole number >= 1"),
    (dict(every_n_steps=2.5), "--save_every_n_steps 2.5: a whole number >= 1"),
    (dict(last_n_epochs=3), "--save_last_n_epochs 3 keeps the last files of --save_every_n_epochs, which is not given"),
    (dict(every_n_steps=10, last_n_epochs=3), "--save_last_n_epochs 3 keeps the last files of --save_every_n_epochs"),
    (dict(last_n_steps=100), "--save_last_n_steps 100 keeps the files of the last N steps of --save_every_n_steps, which is not given"),
    (dict(precision="fp8"), "--save_precision 'fp8': choose float, fp16, bf16"),
    (dict(precision="fp32"), "--save_precision 'fp32': choose float, fp16, bf16 (float is float32)"),
    (dict(name=""), "--output_name '': a file name without a folder"),
    (dict(name="out/sks"), "--output_name 'out/sks': a file name without a folder"),
    (dict(name=".."), "--output_name '..': a file name without a folder"),
])
def test_bad_options_are_refused_in_one_line_naming_the_value(options, refusal):
    with pytest.raises(UserError) as refused:
        SaveSchedule(**{"name": NAME, **options}).check()
    message = str(refused.value)
    assert message.startswith(refusal), message
    assert "\n" not in message, message


def test_huge_values_are_accepted_and_only_the_final_file_is_written(tmp_path):
    huge = 10**12
    schedule = SaveSchedule(name=NAME, every_n_epochs=huge, every_n_steps=huge, last_n_epochs=huge, last_n_steps=huge).check()
    events = run_with_schedule(schedule, tmp_path, steps_per_epoch=3, total_steps=20)
    assert events == [("write", final_file_name(NAME))], events
    assert schedule.expired(step_file_name(NAME, huge)) == []
    assert schedule.expired(epoch_file_name(NAME, huge)) == []


def test_good_options_pass_check_unchanged():
    schedule = SaveSchedule(name=NAME, every_n_epochs=1, every_n_steps=500, last_n_epochs=3, last_n_steps=1500, precision="bf16")
    assert schedule.check() is schedule
