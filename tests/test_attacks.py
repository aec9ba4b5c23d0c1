"""`conceptguard attack` and its parts on the committed MiniCanvas model, with tiny budgets:
the token space and its round trip, the search pieces, the report and PNG, the refusal
without a judge, and HiRM hardened with attack prompts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conceptguard.cli import main
from erasure.attacks.concepts import minicanvas_concept
from erasure.attacks.paraphrase import joins, misspellings
from erasure.attacks.ring_a_bell import RingABellBudget, genetic_search, search_targets
from erasure.attacks.tokens import as_text, attack_vocabulary, layout
from erasure.attacks.unlearndiff import UnlearnDiffBudget, per_image, project_simplex

MODEL = Path(__file__).resolve().parents[1] / "models" / "minicanvas"
TINY = [
    "--seeds", "1", "--steps", "8",
    "--rnd-contexts", "1", "--rnd-samples", "1",
    "--para-contexts", "1",
    "--rab-generations", "2", "--rab-population", "8", "--rab-contexts", "1",
    "--uda-steps", "2", "--uda-contexts", "1", "--uda-draws", "1",
    "--uda-restarts", "2", "--uda-probes", "2", "--rab-probes", "2", "--rab-restarts", "2",
    "--ti-steps", "2", "--ti-contexts", "1", "--ti-per-context", "1", "--ti-batch", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def minicanvas():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def circle_patch(minicanvas, tmp_path_factory):
    """A short HiRM-S run on circle: a real text-encoder patch for the stack."""
    from bench.minicanvas.erasure_settings import hirm_config
    from erasure.hirm import erase_hirm

    config = hirm_config(["circle"], "S", retain=False, steps=10)
    path = tmp_path_factory.mktemp("attack") / "circle.safetensors"
    erase_hirm(minicanvas, config).patches[0].save(path)
    return path


def test_vocabulary_leaves_out_the_concept_words_and_keeps_only_round_tripping_words(
    minicanvas,
):
    tokenizer = minicanvas.tokenizer
    vocabulary = attack_vocabulary(tokenizer, ("circle", "plus sign"))
    words = {tokenizer.convert_ids_to_tokens(int(i)) for i in vocabulary.ids}
    assert not {"circle</w>", "plus</w>", "sign</w>"} & words
    assert all(w.endswith("</w>") for w in words)
    assert set(vocabulary.banned) == {"circle", "plus", "sign"}
    text = as_text(tokenizer, vocabulary.ids[:12].tolist())
    assert text.round_trips
    glued = as_text(tokenizer, tokenizer.convert_tokens_to_ids(["ci", "rcle</w>"]))
    assert glued.text == "circle" and not glued.round_trips  # sent as text, it is 'circle'


def test_layout_puts_the_attack_slots_where_the_prompt_text_is_not(minicanvas):
    tokenizer = minicanvas.tokenizer
    ids, slots = layout(tokenizer, "a drawing of a", 2, "in dots style")
    plain = tokenizer("a drawing of a in dots style").input_ids
    assert ids[0] == tokenizer.bos_token_id and slots == slice(5, 7)
    kept = ids[: slots.start].tolist() + ids[slots.stop : len(plain) + 2].tolist()
    assert kept == plain


def test_simplex_projection_and_paraphrase_words():
    weights = torch.tensor([[0.9, 0.4, -0.2], [0.2, 0.2, 0.2]])
    projected = project_simplex(weights)
    assert torch.allclose(projected.sum(-1), torch.ones(2))
    assert (projected >= 0).all()
    assert torch.allclose(project_simplex(projected), projected)
    assert "circle" not in misspellings("circle") and len(misspellings("circle")) >= 3
    assert "cir cle" in joins("circle")


def test_genetic_search_never_loses_its_best(minicanvas):
    concept = minicanvas_concept("square")
    tokenizer, encoder = minicanvas.tokenizer, minicanvas.text_encoder
    contexts = concept.contexts[:2]
    targets = search_targets(
        encoder, tokenizer, concept.spec, concept.templates, [c.benign for c in contexts], 1.0
    )
    vocabulary = attack_vocabulary(tokenizer, concept.spec.words)
    budget = RingABellBudget(population=8, generations=4, restarts=1)  # one population
    found = genetic_search(encoder, tokenizer, vocabulary.ids, targets, budget, seed=3, keep=3)
    assert all(end <= start for end, start in zip(found.fitness, found.start_fitness, strict=True))
    assert found.ids.shape == (2, budget.tokens)
    for best, ranked in zip(found.ids.tolist(), found.ranked, strict=True):
        assert 1 <= len(ranked) <= 3 and ranked[0] == best
    # Restarts: independent populations (seeds 3 and 4), each one's best offered first.
    pooled = genetic_search(
        encoder, tokenizer, vocabulary.ids, targets, replace(budget, restarts=2), seed=3, keep=2
    )
    other = genetic_search(encoder, tokenizer, vocabulary.ids, targets, budget, seed=4, keep=1)
    for c in range(2):
        bests = sorted([found.candidates(c)[0], other.candidates(c)[0]], key=lambda x: x[1])
        if bests[0][0] != bests[1][0]:
            assert pooled.candidates(c) == bests
        assert pooled.ids[c].tolist() == bests[0][0] and pooled.fitness[c] == bests[0][1]


def test_the_probe_sends_the_candidate_the_judge_recognises_most(minicanvas):
    from erasure.attacks.arena import PROBE_SEED, Arena
    from erasure.attacks.generation import Sampling
    from erasure.attacks.judging import ConceptJudge

    concept = minicanvas_concept("circle")
    context = concept.contexts[0]
    judges = [MODEL / "judges" / f"{n}.safetensors" for n in ("pooled", "strided")]
    arena = Arena(
        minicanvas,
        [],
        concept,
        ConceptJudge.load(judges, "circle"),
        Sampling(seeds=(5000,), steps=8),
        attack_vocabulary(minicanvas.tokenizer, concept.spec.words),
    )
    arena.judge.calibrate(arena.generator.images([context.prompt], (7000, 7001)))
    # Ranked as a search would rank them: the benign prompt first, the concept's own second.
    ranked = [(context, [(context.benign, {"extra": {"rank": 0}}), (context.prompt, {})])]
    drawn = arena.judge(arena.generator.images([context.benign, context.prompt], (PROBE_SEED,)))
    assert drawn.success.tolist() == [False, True]  # what the probe will see
    unchecked = arena.probe(ranked, 1)
    assert [text for _, text, _ in unchecked] == [context.benign]
    ((_, text, fields),) = arena.probe(ranked, 2)
    assert text == context.prompt
    assert fields["extra"]["probe"] == {"tried": 2, "chosen": 1, "recognised": True}
    # Several probe seeds: each candidate's count of recognised images decides.
    seeds = (PROBE_SEED, PROBE_SEED + 1, PROBE_SEED + 2)
    drawn = arena.judge(arena.generator.images([context.benign, context.prompt], seeds))
    counts = drawn.success.reshape(2, 3).sum(1).tolist()
    assert counts[1] > counts[0]
    ((_, text, fields),) = arena.probe(ranked, 2, seeds=3)
    assert text == context.prompt
    assert fields["extra"]["probe"] == {
        "tried": 2,
        "chosen": 1,
        "recognised": True,
        "seeds": 3,
        "recognised_in": counts,
    }


def test_attack_report_and_grid(circle_patch, tmp_path, capsys):
    out, png = tmp_path / "attack.json", tmp_path / "attack.png"
    stack = ["--model", str(MODEL), "--patch", str(circle_patch), "--concept", "circle"]
    outputs = ["--json", str(out), "--grid", str(png)]
    code = main(["attack", *stack, "--attacks", "all", *outputs, *TINY])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "conceptguard.attack/1"
    assert list(report["attacks"]) == [
        "random-tokens",
        "paraphrase",
        "ring-a-bell",
        "ring-a-bell-adaptive",
        "unlearndiff",
        "inversion",
    ]
    for name, record in report["attacks"].items():
        assert 0 <= record["asr"] <= 1, name
        assert record["images"] == record["attempts"] * 1  # one seed
        assert record["successes"] <= record["recognised_including_degenerate"]
        assert "total" in record["seconds"]
        for attempt in record["attempt_records"]:
            assert len(attempt["success"]) == len(attempt["degenerate"]) == 1
    assert report["attacks"]["inversion"]["threat"] == "embedding"
    assert report["attacks"]["ring-a-bell-adaptive"]["details"]["search_encoder"] == "patched"
    assert report["attacks"]["ring-a-bell"]["details"]["search_encoder"] == "original"
    paraphrase = report["attacks"]["paraphrase"]["details"]
    assert "asr_base" in paraphrase and "disc" in paraphrase["per_paraphrase"]
    assert report["config"]["budgets"]["rab"]["generations"] == 2
    assert report["config"]["patches"][0]["method"] == "hirm"
    assert report["config"]["budgets"]["uda"]["probes"] == 2
    probed = report["attacks"]["unlearndiff"]["attempt_records"][0]["probe"]
    assert probed["tried"] <= 2 and probed["chosen"] in (0, 1)
    for record in report["attacks"]["ring-a-bell"]["attempt_records"]:
        assert record["round_trips"] is not None and "circle" not in record["prompt"].split()
    assert png.stat().st_size > 0
    assert "ASR" in capsys.readouterr().out


def test_unlearndiff_fits_its_prefix_to_several_images_of_the_concept(tmp_path):
    """--uda-per-context N: the prefix is fitted to the base's recognised images of each
    context (seeds 7000, ...), not to a single drawing; the draws are shared out."""
    out = tmp_path / "attack.json"
    budget = ["--uda-per-context", "3", "--uda-draws", "3", "--uda-contexts", "2"]
    args = ["attack", "--model", str(MODEL), "--concept", "circle", "--attacks", "unlearndiff"]
    assert main([*args, "--json", str(out), *TINY, *budget]) == 0
    record = json.loads(out.read_text())["attacks"]["unlearndiff"]
    assert record["budget"]["per_context"] == 3
    fitted = [a["fitted_images"] for a in record["attempt_records"]]
    # The base draws circle recognisably in most of its images: every context keeps 2-3.
    assert len(fitted) == 2 and all(2 <= n <= 3 for n in fitted), fitted
    assert per_image(3, 3) == 1 and per_image(4, 3) == 2 and per_image(16, 1) == 16


def test_a_model_without_judges_is_refused(sd_model_path, capsys):
    code = main(["attack", "--model", str(sd_model_path), "--concept", "cat", "--anchor", "dog"])
    assert code == 2
    assert "--judge DIR" in capsys.readouterr().err


def test_white_box_attacks_over_a_server_need_the_patch_files(capsys):
    remote = ["--server", "http://127.0.0.1:9", "--key", "k", "--attacks", "unlearndiff"]
    code = main(["attack", "--model", str(MODEL), "--concept", "circle", *remote])
    assert code == 2
    assert "--patch" in capsys.readouterr().err


def test_hardened_hirm_trains_on_the_prompts_its_search_found(minicanvas):
    from bench.minicanvas.erasure_settings import hirm_config
    from erasure.hirm.hardened import Hardening, harden_hirm
    from erasure.prompts import PromptError

    config = hirm_config(["circle"], "S", retain=False, steps=4)
    search = RingABellBudget(population=8, generations=2, restarts=1)
    prefix = UnlearnDiffBudget(steps=2, restarts=1, draws=1)
    # The rounds' own searches stay the single, unchecked ones hardened HiRM was measured
    # with, whatever the attack command's (calibrated) defaults are.
    default = Hardening()
    assert (default.search.restarts, default.search.probes) == (1, 1)
    assert (default.prefix_search.per_context, default.prefix_search.probes) == (1, 1)
    hardening = Hardening(1, 2, 2, search, prefixes=1, prefix_search=prefix)
    hardened = harden_hirm(minicanvas, config, hardening)
    (round_,) = hardened.rounds
    prompts = round_["concepts"]["circle"]["prompts"]
    assert len(prompts) == 4 and all("circle" not in p.split() for p in prompts)
    (prefixed,) = round_["concepts"]["circle"]["prefixed_prompts"]
    assert "circle" in prefixed.split()[-4:]  # a prefix before a training prompt
    params = hardened.result.patches[0].manifest.params
    assert params["adversarial_rounds"] == 1 and params["adversarial_prompts"] == 5
    assert hardened.result.reports[0]["prompts"] == 2 * 43 + 5  # circle, disc + found
    from dataclasses import replace

    with pytest.raises(PromptError):
        replace(config, adversarial=(("square", "x", "y"),)).check()


def test_sweep_asr_table_pools_concepts_and_merge_needs_the_same_settings():
    from bench.minicanvas.sweep_attacks import asr_table, merged

    def report(successes: int, images: int) -> dict:
        record = {"successes": successes, "images": images, "degenerate": 1}
        record["asr"] = successes / images
        return {"direct": {"base": 1.0, "patched": 0.0}, "attacks": {"unlearndiff": record}}

    table = asr_table({"S": {"circle": report(1, 8), "square": report(3, 8)}})
    entry = table["S"]["attacks"]["unlearndiff"]
    assert entry["asr"] == 4 / 16 and entry["asr_worst"] == 3 / 8 and entry["degenerate"] == 2
    part = {
        "variants": {"S": {"per_concept": {"circle": {"attacks": report(1, 8)}}}},
        "attacks": {"base": {"circle": report(8, 8)}, "config": {"seed": 0}},
    }
    other = {**part, "attacks": {**part["attacks"], "config": {"seed": 1}}}
    result = {"variants": {"S": {"per_concept": {"circle": {"attacks": report(1, 8)}}}}}
    assert merged([part, part], result)["table"]["base"]["attacks"]["unlearndiff"]["asr"] == 1
    with pytest.raises(ValueError):
        merged([part, other], result)
    assert merged([{"variants": {}}], result) is None


def test_attack_table_rows_and_markdown(tmp_path):
    from bench.minicanvas.attack_table import collect, markdown, per_concept_markdown

    def report(successes: int) -> dict:
        record = {
            "successes": successes,
            "images": 8,
            "asr": successes / 8,
            "degenerate": 0,
            "round_trip_failures": 0,
            "seconds": {"total": 5.0},
            "successful_prompts": ["x y"] if successes else [],
            "details": {},
        }
        return {"direct": {"base": 1.0, "patched": 0.0}, "attacks": {"unlearndiff": record}}

    block = {"clean": 1.0, "IRA": 0.9, "IRA_base": 0.95, "attacks": report(1)}
    sweep = {
        "method": "stack",
        "variants": {"S+x": {"per_concept": {"circle": block}}},
        "attacks": {"base": {"circle": report(8)}, "config": {"seed": 0}},
    }
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(sweep))
    table = collect([path])
    assert [r["row"] for r in table["rows"]] == ["base (no patch)", "HiRM-S + ESD-x"]
    assert table["rows"][1]["pooled"]["unlearndiff"]["asr"] == 1 / 8
    text = markdown(table)
    assert "| HiRM-S + ESD-x | 1 | 100.0% | 90.0% (95.0%) | 0.0% |" in text
    assert "12.5% (1/8)" in text and "1/8" in per_concept_markdown(table, "unlearndiff")


def test_attack_settings_compare_judges_by_content(tmp_path, monkeypatch):
    """Sweeps run from another working directory name the same judge files by another path
    (`models/minicanvas/judges/...` or an absolute path): the same attack, so their results
    join; a judge with other bytes, or another budget, is another attack."""
    from bench.minicanvas.attack_table import same_settings

    judges = tmp_path / "model" / "judges"
    judges.mkdir(parents=True)
    (judges / "pooled.safetensors").write_bytes(b"judge one")
    (judges / "other.safetensors").write_bytes(b"judge two")
    monkeypatch.chdir(tmp_path)
    relative = {"judges": ["model/judges/pooled.safetensors"], "seed": 0}
    absolute = {"judges": [str(judges / "pooled.safetensors")], "seed": 0}
    assert same_settings(relative, absolute)
    assert not same_settings(relative, {**absolute, "seed": 1})
    assert not same_settings(relative, {"judges": [str(judges / "other.safetensors")], "seed": 0})


def test_an_attack_suite_names_its_judges_by_content(tmp_path):
    """The settings record (and so the key of results a sweep keeps) is the same whichever
    path names the same judge files, and differs when their bytes do."""
    from erasure.attacks.generation import Sampling
    from erasure.attacks.runner import AttackSuite

    def suite(folder, content=b"judge"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pooled.safetensors").write_bytes(content)
        return AttackSuite(["unlearndiff"], {}, Sampling((5000,)), [folder / "pooled.safetensors"])

    here = suite(tmp_path / "a" / "judges").record()
    assert here == suite(tmp_path / "b" / "judges").record()
    assert here["judges"][0]["file"] == "pooled.safetensors"
    assert here != suite(tmp_path / "c" / "judges", b"another judge").record()
