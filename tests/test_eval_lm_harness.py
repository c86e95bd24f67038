"""The lm-evaluation-harness adapter (`--model megaxatl`): scores equal a direct computation with the
model, generation equals generate(), and the harness's own CLI runs a local task end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fixtures_models import make_model_dir

import lm_eval  # noqa: F401  (a dev dependency: the harness must be there to test the adapter)

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_task"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("lmh") / "model", pattern="M*")


@pytest.fixture(scope="module")
def lm(ckpt):
    from megaxatl.eval.lm_eval_adapter import MegaxatlLM

    return MegaxatlLM(ckpt=str(ckpt), batch_size=3)


def _req(*args):
    return SimpleNamespace(args=args)


def _direct_logprob(model, tokens: list[int], n_scored: int) -> float:
    """Sum of log p(tokens[i] | tokens[:i]) over the last n_scored tokens, one unpadded sequence."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([tokens[:-1]])).float(), -1)[0]
    target = torch.tensor(tokens[1:])
    return float(logp.gather(-1, target[:, None])[-n_scored:].sum())


def test_registered_under_megaxatl(lm):
    from lm_eval.api.registry import get_model

    assert get_model("megaxatl") is type(lm)


def test_loglikelihood_equals_direct_computation(lm):
    pairs = [("the cat sat on", " a mat"), ("héllo wörld", " café 東京 and the dog"), ("it rained", " all"),
             ("x1 42 3.14 the dog ran far away from home while", " it rained all night"), ("", "the cat")]
    got = lm.loglikelihood([_req(c, x) for c, x in pairs], disable_tqdm=True)  # batched 3, right-padded
    tok, eos = lm.tokenizer, lm.eot_token_id
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx:
            ctx_ids = tok(ctx, add_special_tokens=False).input_ids
            whole = tok(ctx + cont, add_special_tokens=False).input_ids
            n = len(whole) - len(ctx_ids)
        else:  # an empty context is conditioned on EOS (the start of a document in training)
            whole = [eos] + tok(cont, add_special_tokens=False).input_ids
            n = len(whole) - 1
        expect = _direct_logprob(lm.model, whole, n)
        assert ll == pytest.approx(expect, rel=1e-5, abs=1e-4), (ctx, cont)
        assert isinstance(greedy, bool)
    # a continuation that extends another is strictly less likely
    (a, _), (b, _) = lm.loglikelihood([_req("the cat", " sat"), _req("the cat", " sat on a mat")], True)
    assert b < a


def test_greedy_flag_is_true_for_the_models_own_argmax(lm):
    ids = lm.tok_encode("the dog ran")
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))[0, -1]
    best = int(logits.argmax())
    [(ll, greedy)] = lm._loglikelihood_tokens([(None, ids, [best])])
    assert greedy and ll == pytest.approx(float(F.log_softmax(logits.float(), -1)[best]), abs=1e-5)


def test_loglikelihood_rolling_equals_full_sequence(lm):
    texts = ["the cat sat on a mat and the dog ran far away", "héllo wörld naïve café 東京 😀"]
    got = lm.loglikelihood_rolling([_req(t) for t in texts], disable_tqdm=True)
    for t, ll in zip(texts, got):
        ids = [lm.eot_token_id] + lm.tok_encode(t)
        assert ll == pytest.approx(_direct_logprob(lm.model, ids, len(ids) - 1), rel=1e-5, abs=1e-4)


def test_loglikelihood_rolling_windows_cover_every_token(ckpt):
    from megaxatl.eval.lm_eval_adapter import MegaxatlLM

    small = MegaxatlLM(ckpt=str(ckpt), batch_size=2, max_length=5)
    text = "the cat sat on a mat and the dog ran far away from home"
    ids = small.tok_encode(text)
    assert len(ids) > 10
    seen = []
    real = small.score_tokens
    small.score_tokens = lambda pairs: (seen.extend(t for _, c in pairs for t in c), real(pairs))[1]
    [ll] = small.loglikelihood_rolling([_req(text)], disable_tqdm=True)
    assert seen == ids and ll < 0


def test_generate_until_equals_generate(lm):
    from megaxatl.models.generation import generate

    prompts = ["the cat", "héllo wörld and the dog ran", "it"]
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([_req(p, dict(gen_kwargs)) for p in prompts], disable_tqdm=True)
    for p, text in zip(prompts, got):
        [new] = generate(lm.model, [lm.tok_encode(p)], 6, eos_token_id=lm.eot_token_id)
        expect = lm.tok_decode([t for t in new if t != lm.eot_token_id]).split("\n\n")[0]
        assert text == expect
    # a stop string cuts the output where it first appears
    first = got[0]
    if len(first) > 1:
        stop = first[1:3]
        [cut] = lm.generate_until([_req(prompts[0], {"until": [stop], "max_gen_toks": 6})], disable_tqdm=True)
        assert cut == first.split(stop)[0]


def test_harness_cli_runs_a_local_task(ckpt, tmp_path):
    """`lm_eval` (through our module, which registers the adapter) on a local JSONL task whose answer is
    known for any model: choice 1 always extends choice 0, gold alternates 0/1 -> acc exactly 0.5."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "megaxatl.eval.lm_eval_adapter", "--model", "megaxatl", "--model_args",
         f"ckpt={ckpt}", "--batch_size", "4", "--tasks", "megaxatl_prefix_choice", "--include_path",
         str(TASK_DIR), "--output_path", str(out), "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result_file] = list(out.rglob("results_*.json"))
    res = json.loads(result_file.read_text())["results"]["megaxatl_prefix_choice"]
    assert res["acc,none"] == 0.5
    n_docs = sum(1 for _ in open(TASK_DIR / "prefix_choice.jsonl"))
    assert json.loads(result_file.read_text())["n-samples"]["megaxatl_prefix_choice"]["effective"] == n_docs
