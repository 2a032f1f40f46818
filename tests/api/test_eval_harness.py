"""An evaluation harness against a real server: lm-eval's OpenAI-completions backend (`local-completions`)
with its default arguments, on a small task written here (a loglikelihood part, a multiple-choice part,
a generate-until part), once against the bare model and once against a task.

Its scores must equal the scores computed in this test from the HF model (and the task's prefix as a
HF PEFT adapter), on the very requests lm-eval logged: the loglikelihoods need the echoed prompt's
logprobs, "is greedy" needs the prompt's alternatives, and lm-eval sends token-id lists (several
prompts per request in the batch API) and `max_tokens` 1 with `echo`. Every decision compared
(greedy or not, which choice wins) is checked to have a margin no float rounding can flip.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from modeling.models import LoadedModel, load_model, make_model_dir
from prefix_store.artifact import PrefixArtifact, dump_artifact
from tests.api.conftest import ACME, TEST_ENGINE, serve_http
from tests.engine.conftest import TINY_OVERRIDES, PeftReference, random_artifact

TASK = "quiz"
KEY = "acme-manage-key"
MARGIN = 1e-3  # logit gaps below this are left undecided (rounding could flip them)
CONTEXTS = [
    "The weather today is",
    "My favourite colour",
    "Once upon a time there",
    "She opened the door and",
]
MC_DOCS = [
    {
        "question": "The capital of France is",
        "choices": ["Paris", "a small blue fish", "seventeen"],
        "label": 0,
    },
    {"question": "Water boils at", "choices": ["one hundred degrees", "midnight"], "label": 0},
    {"question": "A cat says", "choices": ["meow", "woof", "the quick brown fox"], "label": 2},
]
GEN_QUESTIONS = ["Roses are red", "The answer is", "Hello there"]
MAX_GEN_TOKS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, api_model_dir: Path) -> Path:
    if TEST_ENGINE == "vllm":  # the shared vLLM core's model (it has the same large init)
        return api_model_dir
    # Large init: peaked distributions, so greedy choices have clear margins and outputs vary.
    return make_model_dir("tiny-gpt2", tmp_path_factory.mktemp("eval-gpt2"), **TINY_OVERRIDES)


@pytest.fixture
def loaded(model_dir: Path) -> LoadedModel:  # the model `make_api` serves (overrides tests/api's)
    return load_model(str(model_dir), device="cpu", dtype="float32")


class Reference:
    """Scores from the HF model (no task) or HF PEFT with the task's prefix, one sequence at a time."""

    def __init__(self, peft: PeftReference, tokenizer: Any, artifact: PrefixArtifact | None) -> None:
        self.peft, self.tokenizer, self.artifact = peft, tokenizer, artifact

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split of a (context, continuation) request into token ids."""
        whole = self.tokenizer(context + continuation)["input_ids"]
        context_ids = self.tokenizer(context)["input_ids"]
        return context_ids, whole[len(context_ids) :]

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool, float]:
        """(sum of the continuation's logprobs, whether each token is the greedy one, the smallest
        logit gap behind that verdict)."""
        context_ids, cont = self.encode_pair(context, continuation)
        logits = self.peft.step_logits(context_ids, self.artifact, cont)[:-1]  # [C, V]
        logp = logits.log_softmax(-1)
        total = float(sum(logp[i, t] for i, t in enumerate(cont)))
        greedy, margin = True, math.inf
        for i, token in enumerate(cont):
            top2 = logits[i].topk(2)
            if int(top2.indices[0]) == token:
                margin = min(margin, float(top2.values[0] - top2.values[1]))
            else:  # not greedy: decided by the gap between the best and this token
                greedy = False
                margin = float(top2.values[0] - logits[i, token])
                break
        return total, greedy, margin

    def generate(self, prompt: str, until: list[str]) -> tuple[str, float]:
        """Greedy text (cut at the first stop string) and the smallest top-2 logit gap on the way."""
        ids = self.tokenizer(prompt)["input_ids"]
        tokens = self.peft.generate(ids, self.artifact, MAX_GEN_TOKS)
        logits = self.peft.step_logits(ids, self.artifact, tokens)[:-1]  # [T, V]
        gaps = logits.topk(2).values
        margin = float((gaps[:, 0] - gaps[:, 1]).min())
        text = self.tokenizer.decode(tokens)
        for stop in until:
            text = text.split(stop)[0]
        return text, margin


def write_tasks(folder: Path, ll_docs: list[dict], gen_docs: list[dict]) -> None:
    """The three task configs and their local data files (lm-eval's `json` dataset loader)."""
    data = {"ll": ll_docs, "mc": MC_DOCS, "gen": gen_docs}
    for name, docs in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def header(name: str) -> str:
        return (
            f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / f'{name}.jsonl'}\ntest_split: test\n"
        )

    (folder / "tiny_ll.yaml").write_text(
        header("ll") + 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\n'
        'doc_to_target: "{{continuation}}"\nmetric_list:\n'
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "tiny_mc.yaml").write_text(
        header("mc") + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n'
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        header("gen") + 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n'
        f"  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\nmetric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def tool_env(tmp_path: Path) -> dict[str, str]:
    """No hub, no user caches: tokenizers come from the model directory, datasets from local files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        OPENAI_API_KEY=KEY,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


async def run_lm_eval(
    url: str, model: str, model_dir: Path, tasks: Path, out: Path, env: dict[str, str]
) -> Path:
    """`lm_eval --model local-completions` as a user runs it: only the model, the server and the local
    tokenizer are given; every other argument keeps its default. Returns the run's output folder."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lm_eval",
        "--model", "local-completions",
        "--model_args", f"model={model},base_url={url}/v1/completions,tokenizer={model_dir}",
        "--tasks", "tiny_ll,tiny_mc,tiny_gen",
        "--include_path", str(tasks),
        "--output_path", str(out),
        "--log_samples",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=400)
    assert proc.returncode == 0, output.decode(errors="replace")[-4000:]
    return out


def read_run(out: Path) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """(the results' metrics per task, the logged samples per task)."""
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    samples = {}
    for name in ("ll", "mc", "gen"):
        (path,) = out.rglob(f"samples_tiny_{name}_*.jsonl")
        samples[name] = sorted(
            (json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"]
        )
    return results, samples


def check_run(results: dict[str, Any], samples: dict[str, list[dict]], ref: Reference) -> dict[str, float]:
    """Every logged response equals the reference's; the reported metrics equal the reference's."""
    # Loglikelihood: each response (logprob sum, is_greedy) vs the reference on the same arguments.
    lls, greedy = [], []
    for s in samples["ll"]:
        args = s["arguments"]["gen_args_0"]
        total, is_greedy, margin = ref.loglikelihood(args["arg_0"], args["arg_1"])
        got_ll, got_greedy = s["resps"][0][0]
        assert float(got_ll) == pytest.approx(total, abs=1e-3), s["doc"]
        assert margin > MARGIN, f"test data too close to call: {s['doc']} (margin {margin})"
        assert (got_greedy == "True") == is_greedy, s["doc"]
        lls.append(total)
        greedy.append(is_greedy)
    assert results["tiny_ll"]["acc,none"] == pytest.approx(sum(greedy) / len(greedy))
    assert results["tiny_ll"]["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-3)

    # Multiple choice: one loglikelihood per choice; acc (and acc_norm, per character) pick the best.
    acc, acc_norm = [], []
    for s in samples["mc"]:
        choice_lls = []
        for i, resp in enumerate(s["resps"]):
            args = s["arguments"][f"gen_args_{i}"]
            total, _, _ = ref.loglikelihood(args["arg_0"], args["arg_1"])
            assert float(resp[0][0]) == pytest.approx(total, abs=1e-3), (s["doc"], i)
            choice_lls.append(total)
        lengths = [len(c) for c in s["doc"]["choices"]]
        for scores, out in (
            (choice_lls, acc),
            ([x / n for x, n in zip(choice_lls, lengths, strict=True)], acc_norm),
        ):
            ranked = sorted(scores, reverse=True)
            assert ranked[0] - ranked[1] > MARGIN, f"choices too close to call: {s['doc']}"
            out.append(scores.index(ranked[0]) == s["doc"]["label"])
    assert results["tiny_mc"]["acc,none"] == pytest.approx(sum(acc) / len(acc))
    assert results["tiny_mc"]["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm))

    # Generate-until: greedy text up to the stop strings (lm-eval adds the EOS text to `until`).
    matches = []
    for s in samples["gen"]:
        args = s["arguments"]["gen_args_0"]
        until = [*args["arg_1"]["until"], ref.tokenizer.eos_token]
        text, margin = ref.generate(args["arg_0"], until)
        assert margin > MARGIN, f"generation too close to call: {s['doc']}"
        assert s["resps"][0][0] == text, s["doc"]
        matches.append(text == s["doc"]["answer"])
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
    return {
        "ll_acc": results["tiny_ll"]["acc,none"],
        "perplexity": results["tiny_ll"]["perplexity,none"],
        "mc_acc": results["tiny_mc"]["acc,none"],
        "exact_match": results["tiny_gen"]["exact_match,none"],
    }


def design_docs(task_ref: Reference) -> tuple[list[dict], list[dict]]:
    """Loglikelihood docs whose continuation is the task model's greedy one (and one that is not),
    and generation docs whose answer is the task model's greedy output for the first: so the task's
    scores differ from the bare model's by construction."""
    ll_docs = []
    for context in CONTEXTS:
        ids = task_ref.tokenizer(context)["input_ids"]
        tokens = task_ref.peft.generate(ids, task_ref.artifact, 2)
        continuation = task_ref.tokenizer.decode(tokens)
        if task_ref.encode_pair(context, continuation)[1] == tokens:  # survives re-tokenising
            ll_docs.append({"context": context, "continuation": continuation})
    assert len(ll_docs) >= 2, "no usable greedy continuations in the test data"
    ll_docs.append({"context": CONTEXTS[0], "continuation": " and then nothing happened"})
    answer, _ = task_ref.generate(GEN_QUESTIONS[0], ["\n\n", task_ref.tokenizer.eos_token])
    gen_docs = [{"question": GEN_QUESTIONS[0], "answer": answer}]
    gen_docs += [{"question": q, "answer": "world"} for q in GEN_QUESTIONS[1:]]
    return ll_docs, gen_docs


async def test_lm_eval_local_completions_scores_equal_hf_and_peft(make_api, loaded, model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    artifact = random_artifact(loaded.spec, 5, seed=3, task=TASK)
    peft = PeftReference(model_dir, loaded)
    base_ref, task_ref = Reference(peft, tokenizer, None), Reference(peft, tokenizer, artifact)
    ll_docs, gen_docs = design_docs(task_ref)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, ll_docs, gen_docs)
    env = tool_env(tmp_path)

    api = await make_api(start=False)
    async with serve_http(api) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            files = {"artifact": ("p.safetensors", dump_artifact(artifact), "application/octet-stream")}
            r = await client.post("/v1/prefixes", data={"task": TASK}, files=files, headers=ACME)
            assert r.status_code == 201, r.text
        base_out = await run_lm_eval(
            url, api.app.state.prefixserve.config.model_id, model_dir, tasks, tmp_path / "base", env
        )
        task_out = await run_lm_eval(url, TASK, model_dir, tasks, tmp_path / "task", env)

    base = check_run(*read_run(base_out), base_ref)
    task = check_run(*read_run(task_out), task_ref)
    # The task's prefix changes every score (the data was built around the task model's choices).
    assert task["ll_acc"] > base["ll_acc"]
    assert task["exact_match"] > base["exact_match"]
    assert not math.isclose(task["perplexity"], base["perplexity"], rel_tol=1e-3)
