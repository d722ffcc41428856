import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from fedp2eft.core.btlora import default_target_modules
from fedp2eft.core import device as device_module
from fedp2eft.core.device import autocast_for, model_device, resolve_device, resolve_precision, to_device
from fedp2eft.core.features import client_features, feature_layer_names
from fedp2eft.core.tasks import iterate_batches
from fedp2eft.core.training import train
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.simulation import backend_settings

GPU = torch.cuda.is_available()


def test_auto_picks_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cuda" if GPU else "cpu")
    assert resolve_device() == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.skipif(GPU, reason="a CUDA GPU is visible, so asking for one is no error")
@pytest.mark.parametrize("setting", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_naming_the_setting(setting):
    with pytest.raises(FedP2EFTError, match=f"device: {setting} was requested but no CUDA GPU is visible"):
        resolve_device(setting)


@pytest.mark.parametrize("setting", ["tpu", "cuda:x", "gpu"])
def test_unknown_device_names_the_allowed_values(setting):
    with pytest.raises(FedP2EFTError, match=f"device: {setting} is not a known device.*auto, cpu, cuda or cuda:N"):
        resolve_device(setting)


def test_model_device_and_to_device():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "note": "kept"}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"]  # already there: no copy
    assert moved["note"] == "kept"


def test_fp32_computes_in_float32_and_bf16_multiplies_in_bf16_but_keeps_losses_in_float32():
    cpu = torch.device("cpu")
    with autocast_for(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast_for(cpu, "bf16"):
        logits = torch.ones(2, 3) @ torch.ones(3, 4)
        assert logits.dtype == torch.bfloat16
        assert nn.functional.cross_entropy(logits, torch.tensor([0, 1])).dtype == torch.float32
    with pytest.raises(ValueError, match="resolve_precision"):
        autocast_for(cpu, "auto")


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512f"}, "fp32"), ({"avx512f", "avx512_bf16"}, "bf16"),
                                             ({"amx_bf16", "amx_tile"}, "bf16"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_on_a_cpu_that_multiplies_bf16_natively(monkeypatch, flags, expected):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision(" AUTO ", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"  # as asked


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file()
                    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="only an x86 Linux machine whose torch uses AVX2 kernels is known to list avx2")
def test_this_machines_cpu_flags_are_read():
    assert "avx2" in device_module.cpu_flags()


@pytest.mark.parametrize("setting", ["fp16", "float32", "half"])
def test_unknown_precision_names_the_allowed_values(setting):
    with pytest.raises(FedP2EFTError, match=f"precision: {setting} is not a known precision.*auto, bf16, fp32"):
        resolve_precision(setting)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_a_tasks_precision_sets_how_training_and_evaluation_compute(setup, precision, dtype):
    """The task's matmuls run in its precision in training and evaluation; the trained weights, their gradients
    and the loss stay float32 (mixed precision)."""
    base, task, train_examples, test_examples = setup
    task = dataclasses.replace(task, precision=precision)
    model = copy.deepcopy(base)
    outputs: set[torch.dtype] = set()
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    handles = [module.register_forward_hook(lambda _m, _i, out: outputs.add(out.dtype)) for module in linears]
    gradients: set[torch.dtype] = set()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step = optimizer.step
    optimizer.step = lambda: (gradients.update(p.grad.dtype for p in model.parameters() if p.grad is not None),
                              step())
    result = train(model, task, train_examples[:16], optimizer, epochs=1, batch_size=8)
    assert outputs == {dtype} and gradients == {torch.float32}
    outputs.clear()
    metrics = task.evaluate(model, test_examples[:8])
    for handle in handles:
        handle.remove()
    assert outputs == {dtype}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(isinstance(loss, float) for loss in result.step_losses) and metrics["count"] > 0


class DeviceRecorder:
    """A forward pre-hook on every submodule that records the device of every tensor it is called with."""

    def __init__(self, model: nn.Module) -> None:
        self.devices: set[torch.device] = set()
        self.calls = 0
        self.handles = [module.register_forward_pre_hook(self.hook, with_kwargs=True) for module in model.modules()]

    def hook(self, _module, args, kwargs):
        self.calls += 1
        for value in list(args) + list(kwargs.values()):
            if torch.is_tensor(value):
                self.devices.add(value.device)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_training_evaluation_and_features_run_on_the_models_device(setup):
    base, task, train_examples, test_examples = setup
    device = torch.device("cpu")
    model = copy.deepcopy(base).to(device)
    recorder = DeviceRecorder(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    result = train(model, task, train_examples[:16], optimizer, epochs=1, batch_size=8)
    metrics = task.evaluate(model, test_examples[:8])
    names = feature_layer_names(model, default_target_modules(model))
    features = client_features(model, iterate_batches(train_examples[:8], task.feature_collate, 4), names)
    if task.kind == "instruction":
        task.generation_tokens = 2
        try:
            task.generate(model, test_examples[0]["instruction"])
        finally:
            task.generation_tokens = 0
    recorder.close()
    assert result.steps == 2 and metrics["count"] > 0 and features.shape == (2 * len(names),)
    assert recorder.calls > 0
    assert recorder.devices == {device}
    assert all(parameter.device == device for parameter in model.parameters())


def test_clients_get_no_gpu_share_without_a_gpu():
    settings = backend_settings(1.0, None, clients_per_round=4)
    if GPU:
        assert 0 < settings["client_resources"]["num_gpus"] <= 1
    else:
        assert settings["client_resources"]["num_gpus"] == 0.0
        with pytest.raises(FedP2EFTError, match="num_gpus_per_client=0.5"):
            backend_settings(1.0, None, num_gpus_per_client=0.5)
    explicit = backend_settings(1.0, None, num_gpus_per_client=0.0)
    assert explicit["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
