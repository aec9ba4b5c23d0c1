"""`bench erasure-sweep --cache`: patches are reused only when the code that makes them is
the code that made them (a changed method never publishes its old patches' figures)."""

from __future__ import annotations

from conftest import text_encoder_patch

from bench.minicanvas import sweep_methods
from bench.minicanvas.sweep_methods import Made, SweepMethod, SweepOptions, make_patches


def test_a_cached_patch_is_reused_only_under_the_same_code(tiny_sd, tmp_path, monkeypatch):
    calls = []

    def build(pipe, variant, concepts, options, cache):
        calls.append(variant)
        return Made([text_encoder_patch(pipe, seed=len(calls))], 1.5, {"n": len(calls)})

    monkeypatch.setitem(sweep_methods.METHODS, "probe", SweepMethod("probe", "v", build))
    fingerprint = {"value": "code-1"}
    monkeypatch.setattr(sweep_methods, "code_fingerprint", lambda: fingerprint["value"])
    options = SweepOptions()
    first = make_patches(tiny_sd, "probe", "v", ["circle"], options, tmp_path)
    again = make_patches(tiny_sd, "probe", "v", ["circle"], options, tmp_path)
    assert len(calls) == 1 and again.report == {"n": 1} and again.seconds == 1.5
    assert again.patches[0].id == first.patches[0].id
    fingerprint["value"] = "code-2"  # a method or its settings changed
    changed = make_patches(tiny_sd, "probe", "v", ["circle"], options, tmp_path)
    assert len(calls) == 2 and changed.report == {"n": 2}
    assert changed.patches[0].id != first.patches[0].id


def test_the_fingerprint_covers_the_methods_and_their_settings():
    sweep_methods.code_fingerprint.cache_clear()
    assert len(sweep_methods.code_fingerprint()) == 64
    assert "erasure" in sweep_methods._MAKING_CODE
    assert "bench/minicanvas/erasure_settings.py" in sweep_methods._MAKING_CODE


def test_a_dumo_stack_is_each_concepts_own_cached_eraser(tiny_sd, tmp_path, monkeypatch):
    made_for = []

    def build(pipe, variant, concepts, options, cache):
        made_for.append(tuple(concepts))
        return Made([text_encoder_patch(pipe, seed=len(made_for))], 2.0, {"for": concepts})

    monkeypatch.setitem(sweep_methods.METHODS, "dumo", SweepMethod("dumo", "full", build))
    options = SweepOptions()
    alone = make_patches(tiny_sd, "dumo", "full", ["circle"], options, tmp_path)
    stack = make_patches(tiny_sd, "dumo-stack", "full", ["circle", "square"], options, tmp_path)
    # circle's eraser is the cached one; only square's is made; one patch per concept.
    assert made_for == [("circle",), ("square",)]
    assert stack.patches[0].id == alone.patches[0].id and len(stack.patches) == 2
    assert stack.seconds == 4.0 and set(stack.report) == {"circle", "square"}
