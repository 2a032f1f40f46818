"""The suite's FutureWarning policy (tests/warnings_policy.py): a deprecated transformers kwarg passed
from our code fails the test; the same call from a test (a reference computation) only warns."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from modeling.models import load_model
from tests.warnings_policy import OurFutureWarning

CALL = "def call(model, ids):\n    return model(input_ids=ids, past_key_values=DynamicCache())\n"


def test_a_deprecated_kwarg_passed_from_our_code_is_an_error(tiny_gpt2_dir):  # type: ignore[no-untyped-def]
    model = load_model(str(tiny_gpt2_dir), "cpu", "float32").model
    ids = torch.tensor([[1, 2]])  # [1, S]
    with pytest.warns(FutureWarning, match="past_key_values"):
        model(input_ids=ids, past_key_values=DynamicCache())  # from a test: a warning
    # The same call, defined in a module of one of our packages.
    namespace = {"__name__": "training.deprecated_example", "DynamicCache": DynamicCache}
    exec(compile(CALL, "training/deprecated_example.py", "exec"), namespace)
    with pytest.raises(OurFutureWarning, match="past_key_values"):
        namespace["call"](model, ids)
