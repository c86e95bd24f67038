"""Choosing the attention layers a hybrid keeps (megaxatl/transfer/select.py): the measured costs
and the chosen subset against a brute-force search computed another way (zeroed o_proj weights),
the config path (transfer.keep_attention) and the select-layers command."""

from __future__ import annotations

import copy
import json
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from fixtures_donors import make_tiny_donor, write_tiny_tokenizer  # noqa: E402
from megaxatl.transfer.donor_model import donor_model  # noqa: E402
from megaxatl.transfer.select import parse_keep, select_layers  # noqa: E402

N_LAYERS = 5


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
    path = tmp_path_factory.mktemp("donor") / "llama"
    make_tiny_donor("llama", path, seed=3, num_hidden_layers=N_LAYERS)
    write_tiny_tokenizer(path, 203)
    return path


def _direct_loss(model, ids, removed) -> float:
    """The loss with the removed layers' attention output projection zeroed (a different route to
    'this layer's attention contributes nothing' than select.py's forward hooks)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for i in removed:
            m.layers[i].mixer.o_proj.weight.zero_()
            if m.layers[i].mixer.o_proj.bias is not None:
                m.layers[i].mixer.o_proj.bias.zero_()
        logits = m(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


def _ids(n=6, length=33, vocab=203):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_selection_picks_what_a_brute_force_search_picks(donor, keep):
    model, _, n = donor_model(donor)
    ids = _ids()
    base = _direct_loss(model, ids, [])
    brute = {s: _direct_loss(model, ids, [i for i in range(n) if i not in s]) for s in combinations(range(n), keep)}
    best = min(brute, key=brute.get)
    assert sorted(brute.values())[1] - brute[best] > 1e-4, "no unique optimum: the comparison would mean nothing"
    sel = select_layers(model, ids, keep)  # auto: C(5, k) <= 64 -> every subset
    assert sel.method == "exhaustive" and sel.keep == list(best)
    assert abs(sel.joint_loss - brute[best]) < 1e-5 and abs(sel.base_loss - base) < 1e-5
    # the single-layer costs, and greedy = the `keep` costliest
    direct_costs = [_direct_loss(model, ids, [i]) - base for i in range(n)]
    assert max(abs(a - b) for a, b in zip(sel.costs, direct_costs)) < 1e-5
    greedy = select_layers(model, ids, keep, method="greedy")
    assert greedy.method == "greedy" and greedy.evaluated == n + 2
    assert greedy.keep == sorted(sorted(range(n), key=lambda i: -direct_costs[i])[:keep])
    assert abs(greedy.joint_loss - brute[tuple(greedy.keep)]) < 1e-5


def test_greedy_is_exact_when_one_layer_goes(donor):
    model, _, n = donor_model(donor)
    ids = _ids()
    brute = {s: _direct_loss(model, ids, [i for i in range(n) if i not in s]) for s in combinations(range(n), n - 1)}
    assert select_layers(model, ids, n - 1, method="greedy").keep == list(min(brute, key=brute.get))


def test_keep_specs_and_bad_input():
    assert parse_keep("auto:15", 30) == 15 and parse_keep("auto:0.25", 30) == 8 and parse_keep(0.5, 30) == 15
    for bad in ("15", "auto:x", "auto:31", "auto:1.5"):
        with pytest.raises(ValueError, match="keep_attention"):
            parse_keep(bad, 30)


def test_keep_attention_in_a_config_rewrites_the_pattern_and_reports(donor, tmp_path):
    from megaxatl.config import config_from_dict
    from megaxatl.donors import open_donor
    from megaxatl.transfer import from_donor, model_dict_from_donor

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7) % 200 + 3}" for i in range(400)))
    spec = open_donor(donor).spec
    data = {"model": model_dict_from_donor(spec, "M|MMMM", mamba={"d_state": 4}),
            "transfer": {"keep_attention": "auto:2", "select_data": str(text), "select_tokens": 256}}
    cfg = config_from_dict(data)
    model, report = from_donor(donor, cfg)
    assert cfg.model.pattern.count("*") == 2 and cfg.model.pattern.count("M") == 3 and cfg.model.pattern[1] == "|"
    assert cfg.transfer.keep_attention is None
    sel = report.selection
    kept = [i for i, s in enumerate(cfg.model.pattern.replace("|", "")) if s == "*"]
    assert sel["keep"] == kept and len(sel["costs"]) == N_LAYERS
    assert "attention layer selection" in report.table()
    assert [layer.symbol for layer in model.layers] == list(cfg.model.pattern.replace("|", ""))
    # the kept layers hold the donor's attention weights
    d = open_donor(donor)
    for i in kept:
        assert torch.equal(model.layers[i].mixer.q_proj.weight, d.get(f"layers.{i}.mixer.q_proj.weight").float())
    # a cut model cannot be selected for; two LCI kinds are ambiguous
    with pytest.raises(ValueError, match="full-depth"):
        from_donor(donor, config_from_dict({**data, "model": model_dict_from_donor(spec, "MMM")}))
    with pytest.raises(ValueError, match="one LCI mixer symbol"):
        from_donor(donor, config_from_dict({**data, "model": model_dict_from_donor(spec, "MMMSS")}))


def test_select_layers_command(donor, tmp_path, capsys):
    from megaxatl.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 11) % 200 + 3}" for i in range(300)))
    out = tmp_path / "sel.json"
    assert main(["select-layers", "--donor", str(donor), "--data", str(text), "--keep-attention", "2",
                 "--tokens", "200", "--seq-len", "32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    sel = json.loads(out.read_text())
    assert f"pattern: {sel['pattern']}" in printed and sel["pattern"].count("*") == 2 and len(sel["keep"]) == 2
    assert sel["tokens"] == 6 * 32  # 200 tokens -> 6 whole sequences of 33
    assert main(["select-layers", "--donor", str(donor), "--data", str(tmp_path / "nope.txt"),
                 "--keep-attention", "2"]) == 2
