"""Every candidate a norm pass looks at ends as an action or a refusal naming it: no norm is
skipped in silence (a user who asks why a norm stayed gets an answer), on every corpus export."""

import pytest

from models.corpus import CORPUS
from normopt.passes.base import Options
from normopt.passes.pipeline import PASSES
from normopt.rewriter import io
from normopt.rewriter.norms import find_norms
from tests.helpers import annotate

# pass -> which norms are its candidates
CANDIDATES = {
    "preln-to-rmsnorm": lambda m: m.kind == "layernorm",
    "canonicalize-norms": lambda m: m.kind in ("layernorm", "rmsnorm") and m.form == "decomposed",
    "fold-affine-norms": lambda m: (
        m.kind in ("batchnorm", "affine") or m.kind == "evonorm" and m.scale is not None
    ),
    "simplify-evonorm": lambda m: m.kind == "evonorm" and m.detail["variant"].startswith("B"),
    "fold-norm-affine": lambda m: m.kind in ("layernorm", "rmsnorm") and m.form == "op",
}


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("pass_name", sorted(CANDIDATES))
def test_every_candidate_is_changed_or_refused_by_name(corpus, name, pass_name):
    model = io.load(corpus(name).model)
    annotate(model)
    candidates = [m for m in find_norms(model.graph) if CANDIDATES[pass_name](m)]
    result = PASSES[pass_name](Options()).run(model)
    changed = {node for change in result.changes for node in change.nodes}
    named = " | ".join(r.candidate for r in result.refusals)
    silent = [
        m.where()
        for m in candidates
        if not changed.intersection(n.name for n in m.nodes) and m.where() not in named
    ]
    assert not silent, (silent, result.refusals)
    if not candidates:
        assert result.modified or result.refusals  # an idle pass says why
