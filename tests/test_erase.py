"""Erasure: the closed form matches UCE's per-layer formula, erases what it should on the toy model, undoes exactly."""
import pytest
import torch

from studio.edits import named_tensors
from studio.erase import closed_form
from studio.erase.closed_form import attack_map, edited_layers, erase_edit, solve_map
from studio.erase.guard import guard_edit
from studio.errors import EditError, StudioError
from studio.generation import GenerationRequest
from studio.toyworld.presets import erasure_report

OTHERS = ["green", "blue", "yellow", "purple", "orange"]


def state(pipe):
    return {n: t.detach().clone() for n, t in named_tensors(pipe).items()}


def test_shared_map_equals_uce_per_layer_formula():
    g = torch.Generator().manual_seed(0)
    d, out = 16, 24
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    E, G, P = (torch.randn(n, d, generator=g, dtype=torch.float64) for n in (5, 5, 7))
    lam, se, sp = 0.5, 1.0, 0.7
    left = lam * W + se * sum(torch.outer(W @ gi, ei) for gi, ei in zip(G, E)) + sp * sum(torch.outer(W @ p, p) for p in P)
    right = lam * torch.eye(d, dtype=torch.float64) + se * E.T @ E + sp * P.T @ P
    reference = left @ torch.linalg.inv(right)
    assert torch.allclose(W @ solve_map(E, G, P, lam, se, sp), reference, atol=1e-9)
    # the erased vectors now produce (nearly) what the guide did
    T = solve_map(E, G, P, 1e-6, 1.0, 0.0)
    assert torch.allclose(E @ T.T @ W.T, G @ W.T, atol=1e-4)


def test_rece_attack_recovers_less_after_hardening():
    """After an erasure, the attack embedding still reproduces the concept's output; hardening removes that."""
    g = torch.Generator().manual_seed(1)
    d = 12
    W = torch.randn(40, d, generator=g, dtype=torch.float64)
    gram = W.T @ W
    E, G = torch.randn(2, d, generator=g, dtype=torch.float64), torch.zeros(2, d, dtype=torch.float64)
    P = torch.randn(3, d, generator=g, dtype=torch.float64)

    def residual(T):  # how well the edited layer W·T can still produce W·e for the best input
        c = E @ attack_map(gram, T, 1e-3).T
        return ((c @ T.T @ W.T) - E @ W.T).norm() / (E @ W.T).norm()

    T = solve_map(E, G, P, 0.5, 1.0, 1.0)
    hardened = T @ solve_map(E @ attack_map(gram, T, 1e-3).T, G, P, 0.1, 1.0, 0.1)
    assert residual(T) < 0.2  # plain UCE leaves the concept reachable
    assert residual(hardened) > residual(T) + 0.3


def test_erase_red_on_toy_model_measured_and_undone_exactly(manager):
    pipe = manager.pipe
    before = state(pipe)
    entry = manager.apply(erase_edit("red", preserve=OTHERS, templates="toy"))
    assert set(entry.patch.originals) == set(edited_layers(pipe))
    after = state(pipe)
    report = erasure_report(manager, ["red"], OTHERS, seeds=2, steps=10)
    s = {r["group"]: r for r in report.summary()}
    assert s["efficacy: red"]["before"] >= 0.75 and s["efficacy: red"]["after"] <= 0.25
    assert s["generality: synonyms of red"]["after"] <= s["generality: synonyms of red"]["before"] - 0.5
    assert s["specificity: neighbours"]["after"] >= s["specificity: neighbours"]["before"] - 0.2
    assert "robustness: attack on red" in s and report.grid and report.chart() is not None
    assert all(torch.equal(after[n], t) for n, t in state(pipe).items())  # the report left the edit in place
    manager.undo()
    assert all(torch.equal(before[n], t) for n, t in state(pipe).items())
    manager.redo()
    assert all(torch.equal(after[n], t) for n, t in state(pipe).items())


def test_guard_changes_no_weights_and_toggles_exactly(manager):
    request = GenerationRequest("a red circle", seed=0, batch=2, steps=10)
    plain = manager.generate(request).images
    print_before, weights = manager.fingerprint(), {n: t.clone() for n, t in named_tensors(manager.pipe).items()}
    manager.apply(guard_edit("red", templates="toy"))
    assert all(torch.equal(t, weights[n]) for n, t in named_tensors(manager.pipe).items())  # no weight changes
    assert manager.fingerprint() != print_before  # but the fingerprint sees the steering slot
    guarded = manager.generate(request).images
    from studio.toyworld.evaluate import bundled_oracle

    oracle = bundled_oracle()
    assert sum(oracle.presence(im, "red") for im in plain) == 2
    assert sum(oracle.presence(im, "red") for im in guarded) == 0  # measured: 0 of 3 for red and crimson
    blue = manager.generate(GenerationRequest("a blue square", seed=0, batch=2, steps=10)).images
    assert sum(oracle.presence(im, "blue") for im in blue) == 2
    manager.undo()
    assert manager.fingerprint() == print_before
    assert [im.tobytes() for im in manager.generate(request).images] == [im.tobytes() for im in plain]


@pytest.mark.parametrize("edit, message", [
    (erase_edit([" "]), "at least one concept"),
    (erase_edit("red", guide="Red"), "toward itself"),
    (erase_edit("red", preserve=["blue", "red"]), "both erased and preserved"),
    (erase_edit("red", lam=float("nan")), "lam must be"),
    (erase_edit("red", rece_rounds=9), "RECE rounds"),
    (erase_edit("red", templates=["no placeholder"]), "exactly one"),
    (erase_edit("red", templates="poems"), "unknown template preset"),
    (erase_edit("red", colour="x"), "unknown erasure parameter"),
    (guard_edit([]), "at least one concept"),
])
def test_bad_input_is_refused_and_nothing_changes(manager, edit, message):
    print_before = manager.fingerprint()
    with pytest.raises(StudioError, match=message):
        manager.apply(edit)
    assert manager.history() == [] and manager.fingerprint() == print_before


def test_diverging_solve_is_rolled_back(manager, monkeypatch):
    print_before = manager.fingerprint()
    monkeypatch.setattr(closed_form, "solve_map", lambda E, *a: torch.full((E.shape[1],) * 2, float("nan"), dtype=torch.float64))
    with pytest.raises(EditError, match="NaN"):
        manager.apply(erase_edit("red"))
    assert manager.history() == [] and manager.fingerprint() == print_before
