"""Communication accounting of a benchmark run: a stage's traffic summed from its metrics.jsonl, and the size of a
personalized adapter computed from its ranks and the base checkpoint's module shapes, checked against a real PEFT
export of FedP²EFT's kind (per-module ranks, lambda folded into B)."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedp2eft.benchmark.communication import adapter_bytes, adapters_shipped, module_shapes, stage_traffic
from fedp2eft.core.btlora import BTLoRAModel, resolve_target_modules
from fedp2eft.core.budget import select_top_ranks
from fedp2eft.core.personalization import Personalized, frozen_copy


def test_adapter_size_from_ranks_and_shapes_is_the_exported_adapters_size(setup, tmp_path):
    """On the tiny BERT classifier (whose module names carry a wrapper prefix the checkpoint lacks) and Llama."""
    base = setup[0]
    base.save_pretrained(tmp_path / "base")
    targets = resolve_target_modules(base, None)
    torch.manual_seed(1)
    selection = select_top_ranks(torch.rand(len(targets) * 8), targets, 8, budget=3)
    model = BTLoRAModel(frozen_copy(base), selection.ranks, 2.0, init_scales=selection.values, trainable_scales=False)
    Personalized(model, selection.ranks, {}).export(tmp_path / "adapter")

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        exported = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    shapes = module_shapes(tmp_path / "base", selection.ranks)
    assert set(shapes) == set(selection.ranks) and len(set(selection.ranks.values())) > 1
    assert adapter_bytes(selection.ranks, shapes) == exported


def test_adapters_need_every_modules_shape(tmp_path):
    save_file({"body.0.weight": torch.zeros(5, 3), "body.0.bias": torch.zeros(5), "norm.weight": torch.zeros(5)},
              str(tmp_path / "model.safetensors"))
    records = [{"seed": 0, "rows": [{"method": "fedp2eft", "budget": 2, "ranks": {"body.0": 2, "norm": 0}}]}]
    assert module_shapes(tmp_path, ["body.0", "norm"]) == {"body.0": (5, 3)}  # 1-D weights are no linear layer
    records[0]["rows"][0]["ranks"].pop("norm")
    assert adapters_shipped(records, "fedp2eft", tmp_path) == {"method": "fedp2eft", "adapters": 1, "seeds": 1,
                                                              "bytes": 4 * 2 * (3 + 5)}
    records[0]["rows"][0]["ranks"]["head"] = 1  # not in the checkpoint: no number rather than a wrong one
    assert adapters_shipped(records, "fedp2eft", tmp_path) is None


def test_stage_traffic_sums_rounds_and_skips_a_torn_line(tmp_path):
    rows = [{"round": r, "sampled": 2, "bytes_sent": 200, "bytes_received": 150 + r} for r in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "samp')
    traffic = stage_traffic(path)
    assert (traffic.rounds, traffic.client_rounds, traffic.sent, traffic.received) == (3, 6, 600, 456)
    assert traffic.per_round() == (200, 152) and traffic.per_client_round() == (100, 76)
    path.write_text(json.dumps({"round": 1, "sampled": 2}) + "\n")  # logged before bytes were counted
    assert stage_traffic(path) is None
