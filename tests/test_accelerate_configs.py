"""The accelerate config files shipped in configs/accelerate/ (README "Scaling out"): accelerate's own launcher
reads each one into the plugin it would build. DeepSpeed and FSDP need GPUs (and deepspeed installed) to run;
on CPUs this checks what can be checked: that accelerate accepts the files and what they ask for."""

import os
from pathlib import Path
from unittest import mock

import pytest

accelerate = pytest.importorskip("accelerate")
from accelerate.commands.launch import _validate_launch_command, launch_command_parser  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin  # noqa: E402
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env  # noqa: E402

FOLDER = Path(__file__).parent.parent / "configs" / "accelerate"


def launch_args(name: str):
    """What `accelerate launch --config_file configs/accelerate/<name> -m raft run` resolves the file into."""
    args = launch_command_parser().parse_args(["--config_file", str(FOLDER / name), "-m", "raft", "run"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_shipped_file_is_checked():
    assert sorted(p.name for p in FOLDER.glob("*.yaml")) == [
        "cpu-2proc.yaml", "ddp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml", "fsdp.yaml"]


@pytest.mark.parametrize("name, stage", [("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)])
def test_deepspeed_configs_are_accepted(name, stage):
    args, defaults = launch_args(name)
    assert args.use_deepspeed and args.num_processes == 8 and args.mixed_precision == "bf16"
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # as `accelerate launch` does
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # the plugin the Accelerator of each process builds from that environment
    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1  # raft's trainer marks the boundaries
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0


def test_fsdp_config_is_accepted():
    args, _ = launch_args("fsdp.yaml")
    assert args.use_fsdp and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    env["FSDP_SYNC_MODULE_STATES"] = "false"  # building the plugin with it asks for a GPU's index; there is none here
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # checkpoints: one full state dict on the main process


@pytest.mark.parametrize("name, gpus", [("ddp.yaml", True), ("cpu-2proc.yaml", False)])
def test_data_parallel_configs_are_accepted(name, gpus):
    args, _ = launch_args(name)
    assert args.multi_gpu and args.use_cpu == (not gpus)  # multi_gpu: the processes are started with torchrun
    assert args.num_processes == (8 if gpus else 2)


@pytest.mark.parametrize("kind, stage, refused", [("FSDP", None, True), ("DEEPSPEED", 3, True),
                                                   ("DEEPSPEED", 2, False), ("MULTI_GPU", None, False)])
def test_sharded_weights_are_refused_in_one_line(kind, stage, refused):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from raft.errors import RaftError
    from raft.finetune.trainer import refuse_sharded_weights

    plugin = SimpleNamespace(zero_stage=stage) if stage else None
    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(deepspeed_plugin=plugin))
    if not refused:
        refuse_sharded_weights(accelerator)
        return
    with pytest.raises(RaftError, match="^finetune: FSDP and DeepSpeed ZeRO-3 shard the weights") as error:
        refuse_sharded_weights(accelerator)
    assert "\n" not in str(error.value)
