"""The suite's FutureWarning policy (tests/warnings_policy.py): a deprecated library kwarg passed from
our code fails the test; the same call from a test (a reference computation) only warns.

The library here is a stand-in module: which kwargs transformers deprecates changes with its version
(5.24 deprecated `past_key_values`; 5.19, pinned for vLLM, does not), the policy does not.
"""

from __future__ import annotations

import pytest

from tests.warnings_policy import OurFutureWarning

LIBRARY = (
    "import warnings\n"
    "def forward(**kwargs):\n"
    "    if 'past_key_values' in kwargs:\n"
    "        warnings.warn('`past_key_values` is deprecated, use `cache`', FutureWarning, stacklevel=2)\n"
)
OURS = "def call(forward):\n    return forward(past_key_values=())\n"


def module(name: str, source: str, **namespace):  # type: ignore[no-untyped-def]
    namespace = {"__name__": name, **namespace}
    exec(compile(source, name.replace(".", "/") + ".py", "exec"), namespace)
    return namespace


def test_a_deprecated_kwarg_passed_from_our_code_is_an_error():
    forward = module("somelibrary.modeling", LIBRARY)["forward"]
    with pytest.warns(FutureWarning, match="past_key_values"):
        forward(past_key_values=())  # from a test: a warning
    # The same call, defined in a module of one of our packages.
    call = module("training.deprecated_example", OURS)["call"]
    with pytest.raises(OurFutureWarning, match="past_key_values"):
        call(forward)
    # Other warnings from our code are left alone.
    with pytest.warns(UserWarning):
        module("training.other", "import warnings\nwarnings.warn('note', UserWarning)\n")
