"""Built-in synthetic tasks: families, the gold judge, simulated humans and labelers."""

from __future__ import annotations

import json
import random

import pytest

from rlhf.config import TaskConfig
from rlhf.data.tasks import FAMILIES, BuiltinTask, TaskFamily, families, find_family, gold_score, register
from rlhf.data.tasks.base import (
    FILLER_PREFIXES,
    FILLER_SUFFIXES,
    VERBOSITY_PENALTY,
    edit_similarity,
    levenshtein,
)

# ----------------------------------------------------------------------------- registry


def test_builtin_families_registered():
    assert {"reverse", "sort"} <= set(FAMILIES)
    rev, srt = families(["reverse", "sort"])
    assert rev.name == "reverse" and srt.name == "sort"
    assert isinstance(rev, TaskFamily)


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="nope"):
        families(["reverse", "nope"])


def test_find_family_by_prompt():
    assert find_family("reverse: a b c").name == "reverse"
    assert find_family("sort: 3 1 2").name == "sort"
    assert find_family("translate: a b") is None
    assert find_family("reverse: a z") is None  # z is not a letter of the family
    assert find_family("sort: 3 25") is None  # 25 is out of the family's range
    assert find_family("reverse:") is None  # no items


# ----------------------------------------------------------------------------- gold score


def test_gold_exact_target_is_one():
    assert gold_score("reverse: a b c d", " d c b a") == 1.0
    assert gold_score("sort: 3 1 2", " 1 2 3") == 1.0
    # Whitespace layout does not matter, only the items.
    assert gold_score("reverse: a b c d", "d  c b a\n") == 1.0


def test_sort_is_numeric_not_lexicographic():
    assert gold_score("sort: 10 2 1", " 1 2 10") == 1.0
    assert gold_score("sort: 10 2 1", " 1 10 2") == pytest.approx(1 / 3)


# reverse of "a b c d" is " d c b a".
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" d c a b", 0.5),  # two positions swapped at the end
        (" c d b a", 0.5),  # swap neighbours at the front
        (" d c b", 0.75),  # dropped the last item: 3 of max(3, 4)
        (" c b a", 0.75),  # dropped the first item: one edit, wherever it is
        (" d c b a a", 0.8),  # repeated the last item: 4 of 5
        (" d d c b a", 0.8),  # repeated the first item: one edit of 5
        (" d c b h", 0.75),  # replaced one item
        (" a b c d", 0.0),  # lazy: copied the input (4 substitutions)
        ("", 0.0),  # nothing
    ],
)
def test_gold_hand_worked_edit_similarity(completion, expected):
    assert gold_score("reverse: a b c d", completion) == pytest.approx(expected)


def test_each_mistake_kind_scores_below_exact():
    p = "reverse: a b c d"
    for wrong in [" d c a b", " d c b", " d c b a a", " d c b h", " a b c d"]:
        assert gold_score(p, wrong) < 1.0


@pytest.mark.parametrize("filler", [f" {FILLER_PREFIXES[0]} d c b a", f" d c b a , {FILLER_SUFFIXES[0]}",
                                    " ok : d c b a", " d c b a , hope this helps"])
def test_verbose_correct_answer_is_penalised(filler):
    assert VERBOSITY_PENALTY > 0
    assert gold_score("reverse: a b c d", filler) == pytest.approx(1.0 - VERBOSITY_PENALTY)


def test_verbose_and_wrong_gets_both_penalties():
    assert gold_score("reverse: a b c d", " ok : d c a b") == pytest.approx(0.5 - VERBOSITY_PENALTY)


def test_foreign_tokens_count_as_verbose():
    # "z" is not a letter of the family: dropped from the answer and counts as filler.
    assert gold_score("reverse: a b c d", " d c b z") == pytest.approx(0.75 - VERBOSITY_PENALTY)


def test_gold_score_none_for_unknown_prompt():
    assert gold_score("translate: hello", " bonjour") is None
    assert gold_score("", "") is None


def test_family_gold_score_rejects_foreign_prompt():
    rev = FAMILIES["reverse"]
    with pytest.raises(ValueError, match="reverse"):
        rev.gold_score("sort: 1 2", " 1 2")


def test_edit_similarity():
    assert levenshtein(list("kitten"), list("sitting")) == 3
    assert levenshtein([], ["a", "b"]) == 2
    assert edit_similarity([], []) == 1.0
    assert edit_similarity(["a"], []) == 0.0
    assert edit_similarity(["a", "b"], ["a", "c", "d"]) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- simulated humans


def test_mistake_always_differs_from_target():
    for fam in families(["reverse", "sort"]):
        rng = random.Random(0)
        for _ in range(300):
            items = fam.make_items(rng, rng.randint(1, 6))
            answer = fam.target(items)
            wrong = fam.mistake(rng, items, answer)
            assert wrong != answer
            assert fam.gold_score(fam.prompt(items), fam.format_answer(wrong)) < 1.0


def test_respond_with_full_correct_rate_is_exact():
    rev = FAMILIES["reverse"]
    rng = random.Random(3)
    for _ in range(50):
        p = rev.prompt(rev.make_items(rng, 5))
        assert rev.gold_score(p, rev.respond(rng, p, 1.0, 0.5)) == 1.0


def test_prompt_format_round_trips():
    for fam in families(["reverse", "sort"]):
        items = fam.make_items(random.Random(1), 4)
        assert fam.parse_prompt(fam.prompt(items)) == items
        assert fam.format_answer(["x", "y"]) == " x y"


# ----------------------------------------------------------------------------- BuiltinTask

CFG = TaskConfig(num_demonstrations=2000, num_comparisons=2000, num_prompts=50)


@pytest.fixture(scope="module")
def demos():
    return BuiltinTask(CFG, seed=0).demonstrations(random.Random(0))


@pytest.fixture(scope="module")
def comparisons():
    return BuiltinTask(CFG, seed=0).comparisons(random.Random(1))


def test_demonstrations_deterministic(demos):
    again = BuiltinTask(CFG, seed=0).demonstrations(random.Random(0))
    assert again == demos
    other = BuiltinTask(CFG, seed=0).demonstrations(random.Random(1))
    assert other != demos


def test_write_is_deterministic_for_seed(tmp_path):
    cfg = TaskConfig(num_demonstrations=30, num_comparisons=30, num_prompts=30)
    a = BuiltinTask(cfg, seed=5).write(tmp_path / "a")
    b = BuiltinTask(cfg, seed=5).write(tmp_path / "b")
    c = BuiltinTask(cfg, seed=6).write(tmp_path / "c")
    assert set(a) == {"sft", "preference", "prompt"}
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes()
    assert a["sft"].read_bytes() != c["sft"].read_bytes()
    rows = [json.loads(line) for line in a["preference"].read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    rows = [json.loads(line) for line in a["prompt"].read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) == {"prompt"}


def test_demonstrations_shape(demos):
    assert len(demos) == 2000
    fams = {find_family(r["prompt"]).name for r in demos}
    assert fams == {"reverse", "sort"}
    for r in demos:
        n = len(r["prompt"].split()) - 1
        assert CFG.min_items <= n <= CFG.max_items


def test_demonstration_quality_mix(demos):
    golds = [gold_score(r["prompt"], r["completion"]) for r in demos]
    exact = sum(g == 1.0 for g in golds) / len(golds)
    assert CFG.demo_correct_rate - 0.03 <= exact <= CFG.demo_correct_rate + 0.03
    assert exact >= 0.7
    verbose_correct = sum(g == pytest.approx(1.0 - VERBOSITY_PENALTY) for g in golds)
    with_filler = sum(any(f in r["completion"] for f in FILLER_PREFIXES + FILLER_SUFFIXES) for r in demos)
    mistakes = sum(g < 1.0 and not any(f in r["completion"] for f in FILLER_PREFIXES + FILLER_SUFFIXES)
                   for g, r in zip(golds, demos))
    assert verbose_correct > 0.05 * len(demos)
    assert with_filler > 0.05 * len(demos)
    assert mistakes > 0.05 * len(demos)


def test_demo_correct_rate_is_honoured():
    cfg = TaskConfig(num_demonstrations=2000, demo_correct_rate=0.9)
    rows = BuiltinTask(cfg, seed=0).demonstrations(random.Random(0))
    exact = sum(gold_score(r["prompt"], r["completion"]) == 1.0 for r in rows) / len(rows)
    assert 0.87 <= exact <= 0.93


def test_comparisons_never_tie_on_text(comparisons):
    assert len(comparisons) == 2000
    assert all(r["chosen"] != r["rejected"] for r in comparisons)


def _agreement(rows) -> float:
    agree = n = 0
    for r in rows:
        a, b = gold_score(r["prompt"], r["chosen"]), gold_score(r["prompt"], r["rejected"])
        if a != b:
            n += 1
            agree += a > b
    assert n > 0.5 * len(rows)  # enough non-tied pairs to measure anything
    return agree / n


def test_labeler_is_noisy_but_informative(comparisons):
    rate = _agreement(comparisons)
    assert 0.8 <= rate <= 0.995


def test_lower_temperature_agrees_more(comparisons):
    sharp = TaskConfig(num_demonstrations=2000, num_comparisons=2000, num_prompts=50, labeler_temperature=0.02)
    blunt = TaskConfig(num_demonstrations=2000, num_comparisons=2000, num_prompts=50, labeler_temperature=0.5)
    r_sharp = _agreement(BuiltinTask(sharp, 0).comparisons(random.Random(1)))
    r_blunt = _agreement(BuiltinTask(blunt, 0).comparisons(random.Random(1)))
    r_default = _agreement(comparisons)
    assert r_sharp > r_default > r_blunt
    assert r_blunt > 0.5


def test_ranking_has_the_labeler_s_pairwise_odds():
    """A ranking of k answers (Plackett-Luce: gold / temperature plus Gumbel noise) chooses
    each pair with the Bradley-Terry odds `label` uses, sigmoid(gold difference / temperature)."""
    import math

    task = BuiltinTask(TaskConfig(labeler_temperature=0.05), seed=0)
    prompt = "reverse: a b c d"
    answers = [" d c b a", " d c a b", " c d a b", " a b c d", " d c b a , done"]
    golds = [gold_score(prompt, a) for a in answers]
    rng, trials = random.Random(0), 6000
    above = {(i, j): 0 for i in range(5) for j in range(5) if i != j}
    for _ in range(trials):
        ranked = task.rank(rng, prompt, answers)
        assert sorted(ranked) == sorted(answers)
        pos = {a: n for n, a in enumerate(ranked)}
        for i, j in above:
            above[i, j] += pos[answers[i]] < pos[answers[j]]
    for (i, j), n in above.items():
        expected = 1 / (1 + math.exp(-(golds[i] - golds[j]) / 0.05))
        assert abs(n / trials - expected) < 0.025, (answers[i], answers[j], n / trials, expected)
    # the single-pair labeler agrees with the ranking's odds
    wins = sum(task.label(rng, prompt, answers[1], answers[2])[0] == answers[1] for _ in range(trials))
    expected = 1 / (1 + math.exp(-(golds[1] - golds[2]) / 0.05))
    assert abs(wins / trials - expected) < 0.025


def test_builtin_task_rejects_unknown_family():
    with pytest.raises(ValueError, match="nope"):
        BuiltinTask(TaskConfig(families=["nope"]), seed=0)


def test_single_family_config():
    cfg = TaskConfig(families=["sort"], num_prompts=20)
    rows = BuiltinTask(cfg, seed=0).prompts(random.Random(0))
    assert len(rows) == 20
    assert all(r["prompt"].startswith("sort: ") for r in rows)


# ----------------------------------------------------------------------------- plugins


@pytest.fixture
def clean_families():
    before = dict(FAMILIES)
    yield
    FAMILIES.clear()
    FAMILIES.update(before)


def test_register_new_family_plugin(clean_families):
    @register
    class Copy(TaskFamily):
        name = "copy_test"
        prompt_prefix = "copy:"

        def alphabet(self):
            return list("xyz")

        def make_items(self, rng, n):
            return [rng.choice("xyz") for _ in range(n)]

        def target(self, items):
            return list(items)

    (fam,) = families(["copy_test"])
    assert isinstance(fam, Copy)
    assert find_family("copy: x y z") is fam
    assert gold_score("copy: x y z", " x y z") == 1.0
    assert gold_score("copy: x y z", " z y x") == pytest.approx(1 / 3)
    # The built-in generator works with it unchanged.
    cfg = TaskConfig(families=["copy_test", "reverse"], num_demonstrations=200)
    rows = BuiltinTask(cfg, seed=0).demonstrations(random.Random(0))
    names = {find_family(r["prompt"]).name for r in rows}
    assert names == {"copy_test", "reverse"}


def test_plugin_cleanup_happened():
    # Runs after the plugin test in file order: the fixture removed the test family.
    assert "copy_test" not in FAMILIES


def test_register_duplicate_name_raises(clean_families):
    original = FAMILIES["reverse"]

    with pytest.raises(ValueError, match="reverse"):
        @register
        class Again(TaskFamily):
            name = "reverse"
            prompt_prefix = "again:"

            def alphabet(self):
                return ["a"]

            def make_items(self, rng, n):
                return ["a"] * n

            def target(self, items):
                return items

    assert FAMILIES["reverse"] is original


# ----------------------------------------------------------------------------- labelled policy samples


class _Refuse:
    def __call__(self):
        raise AssertionError("committed comparisons are read back, the policy is not loaded again")


def test_policy_comparisons_are_every_pair_of_a_ranking(stand_ins, tmp_path):
    """k samples per prompt, ranked once: every pair of distinct samples is a comparison
    (at most C(k, 2) per prompt), the pairs of a prompt agree with one order, and the
    committed set is read back without sampling again."""
    import torch

    from rlhf.adapters.store import open_store
    from rlhf.config import ModelConfig
    from rlhf.data.schema import PromptRow
    from rlhf.data.tasks.labelling import policy_comparisons
    from rlhf.models.chat import chat_format
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    src, mcfg = str(stand_ins["qwen2"]), ModelConfig()
    tok = load_tokenizer(src, mcfg)
    fmt = chat_format(tok, mcfg, src)
    task = BuiltinTask(TaskConfig(), seed=0)
    rng = random.Random(0)
    prompts = {s: [PromptRow(prompt=task._prompt(rng)) for _ in range(20)] for s in ("train", "eval")}
    store = open_store(str(tmp_path / "run"))
    out = policy_comparisons(task, lambda: load_causal_lm(src, mcfg).eval(), fmt, prompts, {"train": 30, "eval": 7},
                             seed=0, max_new_tokens=6, store=store, device=torch.device("cpu"), k=4)
    for split, n_prompts in (("train", 5), ("eval", 2)):  # ceil(30 / 6), ceil(7 / 6) prompts drawn
        rows = out[split]
        by_prompt: dict[str, list] = {}
        for r in rows:
            assert r.chosen != r.rejected and r.chosen.strip() and r.rejected.strip()
            by_prompt.setdefault(r.prompt, []).append(r)
        assert rows and len(by_prompt) <= n_prompts
        for group in by_prompt.values():
            texts = {t for r in group for t in (r.chosen, r.rejected)}
            assert len(group) == len(texts) * (len(texts) - 1) // 2 <= 6  # every pair, once
            above = {t: sum(r.chosen == t for r in group) for t in texts}  # a total order: wins 0..m-1
            assert sorted(above.values()) == list(range(len(texts)))
    again = policy_comparisons(task, _Refuse(), fmt, prompts, {"train": 30, "eval": 7}, seed=0, max_new_tokens=6,
                               store=store, device=torch.device("cpu"), k=4)
    assert again == out


def test_comparisons_of_a_prompt_form_one_group():
    """Pairs of one prompt share a group (each answer once); other prompts, other turns
    and a group past MAX_GROUP answers start new ones; batches hold ~batch_size pairs."""
    from rlhf.data.schema import PreferenceRow
    from rlhf.stages.comparisons import MAX_GROUP, group_pairs, groups_per_step

    def row(prompt, c, r, messages=None):
        return PreferenceRow(prompt=prompt, chosen=c, rejected=r, messages=messages)

    rows = [row("p", "a", "b"), row("q", "a", "b"), row("p", "a", "c"), row("p", "c", "b"),
            row("p", "a", "b", [{"role": "user", "content": "p"}])]
    enc = [([1, 2, ord(r.chosen)], [1, 2, ord(r.rejected)]) for r in rows]
    groups = group_pairs(rows, enc)
    assert [len(g.seqs) for g in groups] == [3, 2, 2]
    assert groups[0].pairs == [(0, 1), (0, 2), (2, 1)] and groups[0].seqs[2] == [1, 2, ord("c")]
    many = [row("p", f"x{i}", f"y{i}") for i in range(MAX_GROUP)]
    groups = group_pairs(many, [([i], [100 + i]) for i in range(MAX_GROUP)])
    assert all(len(g.seqs) <= MAX_GROUP for g in groups) and sum(len(g.pairs) for g in groups) == MAX_GROUP
    assert groups_per_step(32, group_pairs(rows, enc), 1) == round(32 * 3 / 5)
    assert groups_per_step(32, group_pairs(rows, enc), 4) == 20 and groups_per_step(1, groups, 2) == 2
