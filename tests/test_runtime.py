"""The bf16 policy: unset means autocast on CUDA only; `runtime.bf16: true` means autocast on
CPU too, over fp32 weights, in evaluation and in the Trainer."""

import pytest
import torch

from lorascope import runtime
from lorascope.config import RuntimeConfig
from lorascope.hparams import MethodConfig
from lorascope.training import RunSetup, training_arguments

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("setting", "on_cpu", "on_cuda"), [(None, False, True), (True, True, True), (False, False, False)]
)
def test_bf16_setting_resolves_per_device(setting, on_cpu, on_cuda):
    config = RuntimeConfig(bf16=setting)
    assert runtime.uses_bf16(config, CPU) is on_cpu and runtime.uses_bf16(config, CUDA) is on_cuda


def test_cpu_autocast_runs_products_in_bf16_over_fp32_weights():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with runtime.autocast(CPU, True):
        assert layer(x).dtype == torch.bfloat16
    with runtime.autocast(CPU, False):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32


@pytest.mark.parametrize("setting", [None, True])
def test_the_trainer_gets_the_resolved_setting_on_cpu(setting, tmp_path):
    setup = RunSetup(
        model_name="x",
        task=None,
        method="full",
        seed=1,
        hp=MethodConfig(lr=1e-3),
        runtime=RuntimeConfig(bf16=setting),
        eval_batch_size=8,
    )
    assert training_arguments(setup, CPU, str(tmp_path)).bf16 is bool(setting)
