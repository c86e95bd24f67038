"""`megaxatl generate` on a tiny model folder: output equals generate() (greedy, batch, sampling);
a bad checkpoint is one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_models import make_model_dir

from megaxatl.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gencli") / "model", pattern="M*")


@pytest.fixture(scope="module")
def ref(ckpt):
    """(model, tokenizer, fn(prompts, n, **kw) -> decoded new text per prompt, EOS dropped)."""
    from transformers import AutoTokenizer

    from megaxatl.checkpoint import load_model
    from megaxatl.models.generation import generate

    model = load_model(ckpt)[0].float().eval()
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")

    def run(prompts, n, **kw):
        outs = generate(model, [tok(p).input_ids for p in prompts], n, eos_token_id=tok.eos_token_id, **kw)
        return [tok.decode([t for t in o if t != tok.eos_token_id]) for o in outs]

    return run


def _gen(capsys, *argv):
    rc = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_greedy_equals_generate(ckpt, ref, capsys):
    rc, out, err = _gen(capsys, "--ckpt", ckpt, "--prompt", "the cat sat", "--max-new-tokens", 12)
    assert rc == 0, err
    [new] = ref(["the cat sat"], 12)
    assert out == "the cat sat" + new + "\n"
    assert len(new) > 0


def test_batch_prompts(ckpt, ref, capsys):
    prompts = ["the dog", "héllo wörld and the cat sat on", "x1"]  # different lengths share one batch
    argv = ["--ckpt", ckpt, "--max-new-tokens", 8]
    for p in prompts:
        argv += ["--prompt", p]
    rc, out, err = _gen(capsys, *argv)
    assert rc == 0, err
    assert out == "".join(f"{p}{n}\n" for p, n in zip(prompts, ref(prompts, 8)))
    # each row equals decoding that prompt alone
    assert ref(prompts, 8) == [ref([p], 8)[0] for p in prompts]


def test_sampling_options(ckpt, ref, capsys):
    opts = ["--temperature", 1.5, "--top-k", 20, "--top-p", 0.9, "--seed", 3]
    rc, out1, err = _gen(capsys, "--ckpt", ckpt, "--prompt", "the", "--max-new-tokens", 10, *opts)
    assert rc == 0, err
    rc, out2, _ = _gen(capsys, "--ckpt", ckpt, "--prompt", "the", "--max-new-tokens", 10, *opts)
    assert out1 == out2  # seeded
    [new] = ref(["the"], 10, temperature=1.5, top_k=20, top_p=0.9, seed=3)
    assert out1 == "the" + new + "\n"
    outs = {_gen(capsys, "--ckpt", ckpt, "--prompt", "the", "--max-new-tokens", 10, "--temperature", 1.5,
                 "--seed", s)[1] for s in range(4)}
    assert len(outs) > 1  # sampling does sample


@pytest.mark.parametrize("case", ["missing", "not_model", "bad_tokens"])
def test_bad_input_is_one_line_exit_2(ckpt, tmp_path, capsys, case):
    argv = ["--ckpt", tmp_path / "nope", "--prompt", "x"]
    if case == "not_model":
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "meta.json").write_text("{not json")
        argv = ["--ckpt", tmp_path / "junk", "--prompt", "x"]
    elif case == "bad_tokens":
        argv = ["--ckpt", ckpt, "--prompt", "x", "--max-new-tokens", 0]
    rc, out, err = _gen(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megaxatl generate: error:"), err
