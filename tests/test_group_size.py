"""quantization.weights.group_size: a given value must divide every quantized input size;
unset, the largest of 128/64/32/16 that divides them all is chosen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quota_compile.config import QuantizationSection
from quota_compile.errors import UserError, errors_in
from quota_compile.quant.simulate import settle_group_size


def _model(*in_features: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(n, 8) for n in in_features])


def _spec(**weights) -> QuantizationSection:
    return QuantizationSection.model_validate({"weights": weights, "ignore": []})


@pytest.mark.parametrize(
    ("sizes", "chosen"),
    [((4096, 11008), 128), ((4096, 2816), 128), ((48, 64, 128), 16), ((96, 160), 32), ((192, 320), 64)],
)
def test_unset_takes_the_largest_dividing_size(sizes, chosen):
    spec = settle_group_size(_model(*sizes), _spec())
    assert spec.weights.group_size == chosen
    assert all(n % chosen == 0 for n in sizes)
    assert chosen == 128 or any(n % (2 * chosen) for n in sizes)  # the next one up does not divide


def test_a_given_size_is_kept():
    assert settle_group_size(_model(256, 512), _spec(group_size=32)).weights.group_size == 32


def test_a_given_size_that_does_not_divide_names_key_and_layer():
    with pytest.raises(UserError) as e, errors_in(Path("m.yaml")):
        settle_group_size(_model(64, 48), _spec(group_size=32))
    msg = str(e.value)
    assert msg.startswith("m.yaml: key 'quantization.weights.group_size': 32 does not divide the input size 48 of 1")


def test_no_candidate_divides():
    with pytest.raises(UserError) as e, errors_in(Path("m.yaml")):
        settle_group_size(_model(40, 64), _spec())
    assert "'quantization.weights.group_size'" in str(e.value) and "40, 64" in str(e.value)
    # per output channel needs no group size
    spec = settle_group_size(_model(40, 64), _spec(granularity="per_channel"))
    assert spec.weights.group_size is None


def test_ignored_linears_do_not_count():
    model = _model(64, 40)
    spec = QuantizationSection.model_validate({"ignore": ["1"]})
    assert settle_group_size(model, spec).weights.group_size == 64


def test_a_yaml_with_only_version_and_source_compiles(tiny_bundle: Path):
    # conftest's write_config leaves group_size unset: the tiny model's inputs are 48, 64, 128.
    import yaml

    recipe = yaml.safe_load((tiny_bundle / "recipe.yaml").read_text())
    assert recipe["quantization"]["weights"]["group_size"] == 16
