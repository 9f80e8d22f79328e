"""The waiting-line data, scoring, tokenizer, and the training script of the built-in waitline models."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from engine.models import BUILTIN_NAMES, load_model
from engine.models.registry import asset_model_dir
from engine.offline import train_dllm as waitline_train
from engine.offline.names import FIRST_NAMES, LAST_NAMES, name_pool, split_of
from engine.offline.parallelbench import read_rows, write_rows
from engine.offline.waitline_data import (
    OPEN_ENDED,
    OPERATIONS,
    WaitlineGenerator,
    apply_operation,
    format_list,
    operation_of,
    prompt_text,
    score,
)
from engine.offline.waitline_tokenizer import build_tokenizer, with_rainbow_pads

TINY = waitline_train.Shape(hidden=32, layers=1, heads=2, ffn=64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_generator_is_seeded_and_rows_score_their_own_answers():
    first = [WaitlineGenerator(7).row(op) for op in OPERATIONS]
    assert first == [WaitlineGenerator(7).row(op) for op in OPERATIONS]
    generator = WaitlineGenerator(3)
    for operation in OPERATIONS:
        for _ in range(20):
            row = generator.row(operation)
            people = eval(row["input"]["context"])  # noqa: S307 - a JSON list literal written by the generator
            assert 3 <= len(people) <= 15 and len(set(people)) == len(people)
            answer = row["answer"]["example"] if operation in OPEN_ENDED else row["answer"]
            assert score(operation, answer, row["answer"]) == 1.0
            assert prompt_text(row, operation).startswith("You are managing a waiting line")
            assert len(row["input"]["icl_examples"]) == 1


def test_deterministic_answers_follow_parallelbench_rules():
    people = ["Zoe Adams", "Adam Young", "Adam Baker"]
    rng = random.Random(0)
    assert apply_operation("sort", people, "X Y", rng).answer == ("Adam Baker", "Adam Young", "Zoe Adams")
    assert apply_operation("reverse", people, "X Y", rng).answer == tuple(people[::-1])
    inserted = apply_operation("insert_index", people, "New Person", rng)
    assert inserted.answer[inserted.index] == "New Person" and len(inserted.answer) == 4
    removed = apply_operation("remove_index", people, "X Y", rng)
    assert f"position {removed.index} has left" in removed.prompt
    assert removed.answer == tuple(p for i, p in enumerate(people) if i != removed.index)


def test_validity_scores_reject_wrong_edits():
    given = ["A a", "B b", "C c", "D d"]
    shuffle_answer = {"input": given, "example": ""}
    assert score("shuffle", format_list(given), shuffle_answer) == 0.0  # unchanged order is not a shuffle
    assert score("shuffle", format_list(["B b", "A a", "C c", "D d"]), shuffle_answer) == 1.0
    assert score("shuffle", format_list(["B b", "A a", "C c"]), shuffle_answer) == 0.0
    replace = {"input": given, "word": "N n", "example": ""}
    assert score("replace_random", format_list(["A a", "N n", "C c", "D d"]), replace) == 1.0
    assert score("replace_random", format_list(["N n", "N n", "C c", "D d"]), replace) == 0.0
    insert = {"input": given, "word": "N n", "example": ""}
    assert score("insert_random", format_list(["A a", "B b", "C c", "D d", "N n"]), insert) == 1.0
    assert score("insert_random", format_list(["A a", "C c", "B b", "N n", "D d"]), insert) == 0.0
    remove = {"input": given, "example": ""}
    assert score("remove_random", format_list(["A a", "C c", "D d"]), remove) == 1.0
    assert score("remove_random", format_list(["A a", "D d", "C c"]), remove) == 0.0
    assert score("copy", 'Here: ["A a", "B b"]', format_list(["A a", "B b"])) == 1.0
    assert operation_of("data/waiting_line_n15/replace_random.jsonl") == "replace_random"
    with pytest.raises(ValueError, match="not a waiting-line task file"):
        operation_of("data/sudoku.jsonl")


def test_tokenizer_handles_any_text_and_names_are_single_tokens(tokenizer):
    text = "Héllo wörld ✓ 🙂\ttabs and \"quotes\" 12345"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    specials = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id]
    assert specials == [0, 1, 2, 3]
    firsts, lasts = ([n for n in names if split_of(n) == "train"] for names in (FIRST_NAMES, LAST_NAMES))
    people = [f"{first} {last}" for first, last in zip(firsts, lasts, strict=False)]
    assert len(tokenizer(format_list(people), add_special_tokens=False)["input_ids"]) == 4 * len(people)
    held_out = [n for n in FIRST_NAMES if split_of(n) == "held_out"]  # never merged: no untrained name tokens
    assert held_out and all(len(tokenizer(f" {n}", add_special_tokens=False)["input_ids"]) > 1 for n in held_out)
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()  # the trained merges are deterministic
    invented = WaitlineGenerator(0, invented_rate=1.0).people(5)  # names from syllables: several tokens each
    ids = tokenizer(format_list(invented), add_special_tokens=False)["input_ids"]
    assert len(ids) > 4 * len(invented) and tokenizer.decode(ids) == format_list(invented)


@pytest.mark.parametrize("kind", waitline_train.KINDS)
def test_training_lowers_the_loss_and_the_saved_model_round_trips(kind, tmp_path):
    settings = waitline_train.TrainSettings(
        kind=kind, steps=12, batch_size=8, lr=1e-2, warmup=1, shape=TINY, log_every=4
    )
    model, tokenizer, record = waitline_train.train(settings, log=lambda _: None)
    losses = [point[1] for point in record["loss_curve"]]
    assert record["steps_done"] == 12 and losses[-1] < losses[0] - 0.5
    waitline_train.save(model, tokenizer, tmp_path, "# card")
    loaded = load_model(str(tmp_path))
    ids = torch.tensor([loaded.encode("You are managing a waiting line")])
    expected = model.to(torch.float16).float()(input_ids=ids).logits
    assert torch.allclose(loaded.forward(ids).logits, expected, atol=1e-3)  # RoPE buffers: float32 on reload
    assert loaded.decode(loaded.encode('["Ann Lee"]')) == '["Ann Lee"]'
    # The diffusion model attends both ways (a later token changes an earlier position's logits); AR does not.
    changed = ids.clone()
    changed[0, -1] = loaded.tokenizer.mask_token_id
    earlier_moves = not torch.allclose(loaded.forward(ids).logits[0, 0], loaded.forward(changed).logits[0, 0])
    assert earlier_moves == (kind == "mdlm")
    assert isinstance(loaded.model, LlamaForCausalLM)


def test_held_out_measurement_runs_on_both_kinds(tokenizer):
    for kind in waitline_train.KINDS:
        model = waitline_train.build_model(kind, tokenizer, TINY, seed=0).eval()
        accuracy = waitline_train.held_out_accuracy(model, tokenizer, kind, operations=("copy",), per_operation=2)
        assert set(accuracy) == {"copy"} and 0.0 <= accuracy["copy"] <= 1.0


def test_score_flag_rescores_a_saved_folder_without_training(tokenizer, tmp_path, capsys):
    model = waitline_train.build_model("ar", tokenizer, TINY, seed=0).eval()
    waitline_train.save(model, tokenizer, tmp_path, "# card")
    waitline_train.main(["--model", "ar", "--score", str(tmp_path), "--eval-per-task", "2", "--eval-seed", "7"])
    printed = json.loads(capsys.readouterr().out)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # float16 on disk
    assert printed["held_out"] == waitline_train.held_out_accuracy(reloaded, tokenizer, "ar", per_operation=2, seed=7)
    assert printed["held_out_common"] == waitline_train.held_out_accuracy(reloaded, tokenizer, "ar", per_operation=2,
                                                                          seed=7, common=True)
    assert set(printed["held_out"]) == set(waitline_train.TARGETS) and printed["test_files"] == {}
    with pytest.raises(SystemExit):
        waitline_train.main(["--model", "ar", "--steps", "1"])  # training needs --out


def test_write_card_puts_a_rescoring_into_the_runs_card_and_log_and_refuses_a_soup(tmp_path, capsys):
    folder = tmp_path / "run"
    tiny = ["--batch-size", "2", "--warmup", "1", "--hidden", "32", "--layers", "1", "--heads", "2", "--ffn", "64"]
    waitline_train.main(["--model", "ar", "--steps", "1", *tiny, "--eval-per-task", "1", "--out", str(folder)])
    before = json.loads((folder / "training_log.json").read_text())
    files = tmp_path / "waiting_line"
    for task in waitline_train.TARGETS:
        write_rows(files / f"{task}.jsonl", task, 4)
    capsys.readouterr()
    waitline_train.main(["--model", "ar", "--score", str(folder), "--eval-per-task", "4", "--parallelbench",
                         str(files), "--write-card"])
    printed = json.loads(capsys.readouterr().out)
    after = json.loads((folder / "training_log.json").read_text())
    assert {key: after[key] for key in printed} == printed and after["command"] == before["command"]
    assert after["loss_curve"] == before["loss_curve"] and before["test_files"] == {}
    card = (folder / "README.md").read_text()
    assert f"`{before['command']}`" in card
    assert "## ParallelBench's own test files: `waiting_line` (first 4 rows)" in card  # the rescoring's new file
    for args, message in (([], "goes with --score"), (["--score", str(tmp_path)], "no training_log.json")):
        with pytest.raises(SystemExit):
            waitline_train.main(["--model", "ar", "--write-card", *args])
        assert message in capsys.readouterr().err
    (folder / "training_log.json").write_text(json.dumps({**after, "soup_of": [after, after]}))
    with pytest.raises(SystemExit):
        waitline_train.main(["--model", "ar", "--score", str(folder), "--write-card"])
    assert "weight average" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["waitline-mdlm", "waitline-ar"])
def test_builtin_waitline_models_load_by_name(name):
    assert name in BUILTIN_NAMES
    if not (asset_model_dir(name) / "config.json").is_file():
        pytest.skip(f"{name} has not been trained into {asset_model_dir(name)} yet")
    loaded = load_model(name)
    assert loaded.name == name and loaded.tokenizer.mask_token_id == 3
    assert getattr(loaded.model.config, "is_causal", True) == (name == "waitline-ar")


def test_training_continues_from_a_saved_folder_of_the_same_kind(tmp_path):
    first = waitline_train.TrainSettings(kind="ar", steps=2, batch_size=4, warmup=1, shape=TINY, log_every=1)
    model, tokenizer, record = waitline_train.train(first, log=lambda _: None)
    waitline_train.save(model, tokenizer, tmp_path, "# card")
    (tmp_path / "training_log.json").write_text('{"steps_done": 2, "seconds": 1, "loss_curve": [[2, 7.0]]}')
    more = waitline_train.TrainSettings(**{**first.__dict__, "seed": 1, "init_from": str(tmp_path)})
    continued, _, record = waitline_train.train(more, log=lambda _: None)
    assert record["continued_from"]["steps_done"] == 2
    assert [point[0] for point in waitline_train._whole_curve(waitline_train._history(record))] == [2, 3, 4]
    diffusion = waitline_train.TrainSettings(**{**more.__dict__, "kind": "mdlm", "steps": 0})
    adapted, _, _ = waitline_train.train(diffusion, log=lambda _: None)  # AR-initialised, as Dream adapts AR models
    assert waitline_train.shifts_logits(adapted) and adapted.config.is_causal is False
    ar_weights = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    assert all(torch.equal(adapted.state_dict()[name], value) for name, value in ar_weights.items())
    # The shifted loss scores each masked token from the state before it: check it on one batch by hand.
    batches = waitline_train.Batches(tokenizer, seed=5, batch_size=2)
    noise = torch.Generator().manual_seed(9)
    loss = waitline_train.mdlm_loss(adapted, batches, noise)
    batches, noise = waitline_train.Batches(tokenizer, seed=5, batch_size=2), torch.Generator().manual_seed(9)
    ids, answer_side, _ = batches.mdlm()
    t = (torch.rand(1, generator=noise) + torch.arange(2) / 2) % 1.0
    p_mask = ((1 - waitline_train.MASK_EPS) * t + waitline_train.MASK_EPS)[:, None]
    masked = (torch.rand(ids.shape, generator=noise) < p_mask) & answer_side
    logits = adapted(input_ids=ids.masked_fill(masked, 3)).logits
    rows, cols = masked.nonzero(as_tuple=True)
    manual = torch.nn.functional.cross_entropy(logits[rows, cols - 1], ids[rows, cols], reduction="none")
    assert torch.allclose(loss, (manual / p_mask[rows, 0]).sum() / answer_side.sum(), atol=1e-5)
    mdlm_folder = tmp_path / "mdlm"
    waitline_train.save(adapted, tokenizer, mdlm_folder, "# card")
    with pytest.raises(ValueError, match="not a waitline-ar model folder"):
        waitline_train.train(waitline_train.TrainSettings(**{**more.__dict__, "init_from": str(mdlm_folder)}),
                             log=lambda _: None)


def test_the_curriculum_watches_the_answers_own_tokens_not_the_padding(tokenizer):
    """MDLM rows pad the answer side with end of text; the curriculum's signal is the loss over each answer and its
    first end of text only, and for AR (no padding) it is the loss itself."""
    batches = waitline_train.Batches(tokenizer, seed=3, batch_size=4)
    pairs = waitline_train.Batches(tokenizer, seed=3, batch_size=4).encoded()
    ids, answer_side, own = batches.mdlm()
    for row, (prompt, answer) in enumerate(pairs):
        assert own[row].nonzero().flatten().tolist() == list(range(len(prompt), len(prompt) + len(answer)))
        assert (ids[row][answer_side[row] & ~own[row]] == tokenizer.eos_token_id).all()  # the rest is padding
    model = waitline_train.build_model("mdlm", tokenizer, TINY, 0)
    noise = torch.Generator().manual_seed(1)
    rows = waitline_train.mdlm_rows(waitline_train.Batches(tokenizer, seed=3, batch_size=4), noise, 3)
    loss, signal = waitline_train.rows_loss(model, rows)
    logits = model(input_ids=rows.inputs).logits
    scored = (rows.targets != -100) & rows.own
    manual = torch.nn.functional.cross_entropy(logits[scored], rows.targets[scored], reduction="none")
    assert signal == pytest.approx(((manual * rows.weights[scored]).sum() / own.sum()).item(), rel=1e-4)
    ar = waitline_train.build_model("ar", tokenizer, TINY, 0)
    ar_loss, ar_signal = waitline_train.rows_loss(ar, waitline_train.ar_rows(waitline_train.Batches(tokenizer, 3, 4)))
    assert ar_signal == pytest.approx(ar_loss.item(), rel=1e-5)


def test_ar_micro_batches_cut_to_their_rows_lengths_give_the_padded_batchs_loss_and_gradient(tokenizer):
    """Right padding changes nothing before it in a causal model: rows sorted by length and cut to the longest of
    their micro-batch give the loss and gradient of the whole padded batch."""
    batches = waitline_train.Batches(tokenizer, seed=5, batch_size=8)
    batches.generator.icl_share = 0.5  # in-context rows are long: the batch has very unequal lengths
    rows = waitline_train.ar_rows(batches)
    assert rows.lengths.min() < 0.8 * rows.inputs.shape[1]
    for row, length in enumerate(rows.lengths.tolist()):
        assert rows.inputs[row, length - 1] == tokenizer.eos_token_id and (rows.targets[row, length - 1:] == -100).all()
    model = waitline_train.build_model("ar", tokenizer, TINY, 0)
    _assert_step_equals(model, rows, 3, waitline_train.rows_loss(model, dataclasses.replace(rows, lengths=None))[0])


def _assert_step_equals(model: LlamaForCausalLM, rows: waitline_train.LossRows, micro_batch: int,
                        reference: torch.Tensor) -> None:
    """training_step's loss and gradient in micro-batches equal those of ``reference`` (a loss, not backpropagated)."""
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, _ = waitline_train.training_step(model, rows, micro_batch, torch.autocast("cpu", enabled=False))
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4) for p, g in zip(model.parameters(), expected))


def test_width_groups_pad_rows_of_similar_length_together_and_micro_batches_never_mix_widths(tokenizer):
    """--width-group: each group of rows of similar length gets LLaDA's random common width (the canvas of the
    group's shortest prompt at most GEN_LENGTH, unless the longest row is longer); a micro-batch holds one width only
    (a bidirectional row would otherwise read the wider rows' padding), so the batch's loss and gradient are those of
    each group run at its own width."""
    batches = waitline_train.Batches(tokenizer, seed=5, batch_size=8)
    batches.generator.icl_share = 0.5  # in-context rows are long: the batch has very unequal lengths
    pairs = waitline_train.Batches(tokenizer, seed=5, batch_size=8)
    pairs.generator.icl_share = 0.5
    pairs = sorted(pairs.encoded(), key=lambda pair: len(pair[0]) + len(pair[1]))
    rows = waitline_train.mdlm_rows(batches, torch.Generator().manual_seed(2), 3, prefix_share=0.5, shift=True,
                                    width_group=4)
    widths = rows.lengths.tolist()
    assert widths == [widths[0]] * 4 + [widths[4]] * 4
    for group, width in ((pairs[:4], widths[0]), (pairs[4:], widths[4])):
        longest = max(len(p) + len(a) for p, a in group)
        assert longest <= width <= max(longest, min(len(p) for p, _ in group) + waitline_train.GEN_LENGTH)
    for row, (prompt, answer) in enumerate(pairs):
        assert rows.inputs[row, : len(prompt)].tolist() == prompt  # the prompt is never masked
        assert (rows.targets[row, widths[row]:] == -100).all()  # nothing is scored past the row's own canvas
    assert rows.normaliser == sum(width - len(prompt) for width, (prompt, _) in zip(widths, pairs))
    assert [len(chunk) for chunk in waitline_train.micro_batches(rows, 8)] == [4, 4]
    assert [len(chunk) for chunk in waitline_train.micro_batches(rows, 3)] == [3, 1, 3, 1]
    model = waitline_train.build_model("mdlm", tokenizer, TINY, 0)
    expected = 0.0
    for group in (slice(0, 4), slice(4, 8)):  # each group alone, cut to its width by hand
        width = widths[group.start]
        alone = waitline_train.LossRows(*(values[group, :width] for values in (rows.inputs, rows.targets,
                                                                                rows.weights)),
                                        rows.normaliser, rows.own[group, :width], rows.own_count)
        expected = expected + waitline_train.rows_loss(model, alone)[0]
    _assert_step_equals(model, rows, 8, expected)
    with pytest.raises(ValueError, match="MDLM only"):
        waitline_train.train(waitline_train.TrainSettings(kind="ar", steps=1, shape=TINY, width_group=4))


def test_the_width_bench_times_both_paddings_on_the_same_batches(capsys):
    from cli import bench_mdlm_widths

    ratios = bench_mdlm_widths.main(steps=1, width_group=2, batch_size=4, micro_batch=2)
    shown = capsys.readouterr().out
    assert "one width per batch" in shown and "one width per 2 rows" in shown
    assert ratios["speedup"] > 0 and ratios["columns"] > 0


def test_the_precision_bench_times_both_precisions_on_the_same_batches(capsys):
    from cli import bench_mdlm_widths

    ratios = bench_mdlm_widths.compare_precisions(steps=1, width_group=2, batch_size=4, micro_batch=2)
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if "s/step" in line]
    assert [line[0] for line in lines] == ["bfloat16", "float32"] and ratios["float32_speedup"] > 0
    assert lines[0][-1] == lines[1][-1]  # the same canvas columns: the same rows, padded alike


def test_clean_prefix_keeps_a_leading_run_of_the_answer_for_the_chosen_share():
    answer_side = torch.zeros(400, 12, dtype=torch.bool)
    answer_side[:, 4:] = True
    noise = torch.Generator().manual_seed(0)
    clean = waitline_train.clean_prefix(answer_side, 0.5, noise)
    assert not clean[:, :4].any()  # the prompt is never part of it
    lengths = clean.sum(-1)
    for row, length in zip(clean, lengths, strict=True):  # a contiguous run from the answer's first position
        assert row[4: 4 + length].all() and not row[4 + length:].any()
    cut_rows = (lengths > 0).float().mean().item()
    assert 0.35 < cut_rows < 0.55  # half the rows are chosen; a chosen row's cut may fall on the answer's start
    assert set(lengths.tolist()) == set(range(8))  # every cut from 0 to 7 of the 8 answer positions: one stays
    assert not waitline_train.clean_prefix(answer_side, 0.0, noise).any()
    assert waitline_train.clean_prefix(answer_side, 1.0, noise).sum(-1).float().mean() > 3
    answer_side[200:, 8:] = False  # shorter canvases: a cut stays inside each row's own answer side
    assert set(waitline_train.clean_prefix(answer_side, 1.0, noise)[200:].sum(-1).tolist()) == set(range(4))


def test_task_weights_override_the_mix_and_reject_unknown_tasks(tokenizer):
    weights = waitline_train.task_weights(["sort=6", "copy=0"])
    assert weights == {"sort": 6.0, "copy": 0.0}
    with pytest.raises(SystemExit, match="unknown task 'sorting'"):
        waitline_train.task_weights(["sorting=2"])
    batches = waitline_train.Batches(tokenizer, seed=1, batch_size=16, task_weights={"reverse": 1.0})
    assert {example.operation for example in batches.examples()} == {"reverse"}


class _RightmostFirst(torch.nn.Module):
    """A stand-in diffusion model: the further right a masked position, the more confident its proposal (token 40)."""

    config = type("Config", (), {"mask_token_id": 3})()

    def __init__(self) -> None:
        super().__init__()
        self.canvases: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask, position_ids):
        self.canvases.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, 50)
        logits[..., 40] = 0.05 * torch.arange(input_ids.shape[1]).float()  # distinct, unsaturated probabilities
        return type("Output", (), {"logits": logits})()


@pytest.mark.parametrize(("block", "first_filled"), [(waitline_train.GEN_LENGTH, -1), (8, 7), (1, 0)])
def test_held_out_unmasking_stays_inside_the_current_block(tokenizer, block, first_filled):
    model = _RightmostFirst()
    waitline_train.answer_mdlm(model, tokenizer, [[1, 5, 6]], block=block)
    answer_after_one_step = model.canvases[1][0, 3:]
    assert (answer_after_one_step != 3).nonzero().flatten().tolist() == [first_filled % waitline_train.GEN_LENGTH]


class _EndsAt(torch.nn.Module):
    """A stand-in diffusion model: token 40 proposed leftmost first, and end of text at answer column ``end``, the most
    confident proposal of all, unless the row's prompt holds token 9."""

    config = type("Config", (), {"mask_token_id": 3})()

    def __init__(self, prompt_length: int, end: int, eos: int) -> None:
        super().__init__()
        self.column, self.eos, self.rows = prompt_length + end, eos, []  # rows in each call

    def forward(self, input_ids, attention_mask, position_ids):
        self.rows.append(len(input_ids))
        logits = torch.zeros(*input_ids.shape, 50)
        logits[..., 40] = 5 - 0.01 * torch.arange(input_ids.shape[1]).float()
        logits[~(input_ids == 9).any(-1), self.column, self.eos] = 10.0
        return type("Output", (), {"logits": logits})()


def test_held_out_unmasking_stops_once_every_answer_is_settled(tokenizer):
    """Once each row has an end of text with nothing masked before it, later steps could only fill the padding after
    it: the answers are final, so the row leaves the batch; a row that never ends keeps the calls going."""
    model = _EndsAt(prompt_length=3, end=5, eos=tokenizer.eos_token_id)
    assert waitline_train.answer_mdlm(model, tokenizer, [[1, 5, 6], [1, 7, 8]]) == [[40] * 5, [40] * 5]
    assert len(model.rows) == 6  # the end of text first (most confident), then the five tokens before it
    model = _EndsAt(prompt_length=3, end=5, eos=tokenizer.eos_token_id)
    answers = waitline_train.answer_mdlm(model, tokenizer, [[1, 5, 6], [1, 9, 8]], block=8)
    assert answers == [[40] * 5, [40] * waitline_train.GEN_LENGTH]
    assert model.rows == [2] * 6 + [1] * (waitline_train.GEN_LENGTH - 6)


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path):
    settings = waitline_train.TrainSettings(kind="mdlm", steps=4, batch_size=4, warmup=1, shape=TINY, log_every=1,
                                            prefix_share=0.5, checkpoint_every=100)
    whole, _, whole_record = waitline_train.train(settings, log=lambda _: None)
    lines = []
    _, _, stopped = waitline_train.train(settings, log=lines.append, work=tmp_path, until=2)
    assert stopped["steps_done"] == 2 and not stopped["finished"] and (tmp_path / "checkpoint.pt").is_file()
    resumed, _, record = waitline_train.train(settings, log=lines.append, work=tmp_path)
    assert any("resuming at step 2/4" in line for line in lines)
    assert record["finished"] and [p[:2] for p in record["loss_curve"]] == [p[:2] for p in whole_record["loss_curve"]]
    assert all(torch.equal(value, resumed.state_dict()[name]) for name, value in whole.state_dict().items())
    other = waitline_train.TrainSettings(**{**settings.__dict__, "lr": 0.5})
    with pytest.raises(ValueError, match="other settings"):
        waitline_train.train(other, log=lambda _: None, work=tmp_path)


def test_the_data_streams_position_survives_json(tokenizer):
    batches, noise = waitline_train.Batches(tokenizer, seed=3, batch_size=4), torch.Generator().manual_seed(5)
    for _ in range(2):
        waitline_train.mdlm_loss(waitline_train.build_model("mdlm", tokenizer, TINY, 0), batches, noise, 0.5)
    saved = json.loads(json.dumps(waitline_train.stream_state(batches, noise)))
    again, again_noise = waitline_train.Batches(tokenizer, seed=3, batch_size=4), torch.Generator()
    waitline_train.restore_stream(saved, again, again_noise)
    assert torch.equal(batches.mdlm()[0], again.mdlm()[0]) and torch.equal(torch.rand(3, generator=noise),
                                                                           torch.rand(3, generator=again_noise))


def test_a_committed_unfinished_model_continues_without_its_checkpoint(tmp_path):
    """A fresh machine has the committed weights and training log, not the checkpoint: training goes on from them."""
    settings = waitline_train.TrainSettings(kind="ar", steps=4, batch_size=4, warmup=1, shape=TINY, log_every=1)
    model, tokenizer, stopped = waitline_train.train(settings, log=lambda _: None, until=2)
    waitline_train.save(model, tokenizer, tmp_path, "# card")
    (tmp_path / "training_log.json").write_text(json.dumps({**stopped, "command": "c", "held_out": {}}))
    lines = []
    continued, _, record = waitline_train.train(settings, log=lines.append, saved=tmp_path)
    assert "continuing at step 2/4" in lines[0] and record["finished"]
    assert [p[0] for p in record["loss_curve"]] == [1, 2, 3, 4] and record["restarts_without_optimizer_state"] == 1
    scores, card = {"held_out": {}, "test_files": {}, "held_out_common": {}}, tmp_path / "card"
    card.mkdir()
    waitline_train.write_card(card, {**record, "command": "c"}, scores, waitline_train.GEN_LENGTH, continued)
    assert "Continued 1 time(s) on a machine without its checkpoint" in (card / "README.md").read_text()
    other = waitline_train.TrainSettings(**{**settings.__dict__, "seed": 9})
    with pytest.raises(ValueError, match="unfinished run with other settings"):
        waitline_train.train(other, log=lambda _: None, saved=tmp_path)


def test_a_run_scored_on_no_rows_says_so_on_its_card_rather_than_zero_percent(tokenizer):
    model = waitline_train.build_model("ar", tokenizer, TINY, seed=0).eval()
    scores = waitline_train.card_scores(model, tokenizer, "ar", 0, folders=(Path("/nowhere"),))
    assert scores == {"held_out": {}, "held_out_common": {}, "test_files": {}}
    tables, files = waitline_train.score_sections(scores["held_out"], scores["held_out_common"], scores["test_files"])
    assert tables.startswith("Not scored") and "%" not in tables and files == ""


def test_the_card_scores_parallelbench_test_files_given_beside_the_fresh_lists(tmp_path, capsys):
    files = tmp_path / "waiting_line"
    for task in waitline_train.TARGETS:
        write_rows(files / f"{task}.jsonl", task, 3, seed=31_940)
    out = tmp_path / "model"
    waitline_train.main(["--model", "ar", "--steps", "2", "--batch-size", "2", "--warmup", "1", "--hidden", "32",
                         "--layers", "1", "--heads", "2", "--ffn", "64", "--eval-per-task", "2",
                         "--parallelbench", str(files), "--out", str(out)])
    log = json.loads((out / "training_log.json").read_text())
    (name, scores), = log["test_files"].items()
    assert name == "`waiting_line` (first 2 rows)" and set(scores) == set(waitline_train.TARGETS)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    cases = {task: [(prompt_text(row, task), row["answer"]) for row in read_rows(files / f"{task}.jsonl")[:2]]
             for task in waitline_train.TARGETS}
    assert scores == waitline_train.accuracy(model, tokenizer, "ar", cases)
    card = (out / "README.md").read_text()
    assert "## ParallelBench's own test files: `waiting_line` (first 2 rows)" in card and "| sort |" in card
    assert "Lists of held-out common English names only" in card and set(log["held_out_common"]) == set(scores)
    assert log["finished"] and not (tmp_path / "model.work").exists()


@pytest.mark.parametrize(("kind", "flag", "value", "card_text"), [
    ("mdlm", "--width-group", "2", "to a random width common to each group of 2 rows of similar length"),
    ("ar", "--long-share", "0.5", "50% of the batches all of the longest"),
    ("ar", "--invented-rate", "0.3", "30% of names invented from syllables"),
])
def test_a_data_setting_is_part_of_the_command_and_the_card(tmp_path, kind, flag, value, card_text):
    out = tmp_path / "model"
    waitline_train.main(["--model", kind, "--steps", "2", "--batch-size", "4", "--warmup", "1", "--hidden", "32",
                         "--layers", "1", "--heads", "2", "--ffn", "64", "--eval-per-task", "1", flag, value,
                         "--out", str(out)])
    log = json.loads((out / "training_log.json").read_text())
    assert log["command"].endswith(f"{flag} {value}") and str(log["settings"][flag[2:].replace("-", "_")]) == value
    assert card_text in (out / "README.md").read_text()


def test_a_setting_added_since_a_run_began_must_stay_at_its_default():
    settings = waitline_train.TrainSettings(kind="mdlm", shape=TINY)
    written = {key: value for key, value in dataclasses.asdict(settings).items() if key != "width_group"}
    waitline_train.check_added_settings(settings, written)
    with pytest.raises(ValueError, match="width_group: the run so far was trained before this setting existed"):
        waitline_train.check_added_settings(dataclasses.replace(settings, width_group=8), written)
    waitline_train.check_added_settings(dataclasses.replace(settings, width_group=8), {**written, "width_group": 8})


def test_a_common_name_mixture_changes_only_the_steps_from_its_start(tmp_path):
    settings = waitline_train.TrainSettings(kind="ar", steps=4, batch_size=4, warmup=1, shape=TINY, log_every=1)
    mixed = waitline_train.TrainSettings(**{**settings.__dict__, "common_share": 1.0, "common_from": 2})
    _, _, plain_record = waitline_train.train(settings, log=lambda _: None)
    _, _, mixed_record = waitline_train.train(mixed, log=lambda _: None)
    plain_curve, mixed_curve = ([p[1] for p in r["loss_curve"]] for r in (plain_record, mixed_record))
    assert plain_curve[:2] == mixed_curve[:2] and plain_curve[2:] != mixed_curve[2:]
    # a run written before the mixture continues under it from where it stopped, as the whole mixed run did
    waitline_train.train(settings, log=lambda _: None, work=tmp_path, until=2)
    _, _, resumed = waitline_train.train(mixed, log=lambda _: None, work=tmp_path)
    assert [p[1] for p in resumed["loss_curve"]] == mixed_curve
    early = waitline_train.TrainSettings(**{**settings.__dict__, "common_share": 1.0, "common_from": 1})
    waitline_train.train(settings, log=lambda _: None, work=tmp_path / "again", until=2)
    with pytest.raises(ValueError, match="start the new one at step 2 or later"):
        waitline_train.train(early, log=lambda _: None, work=tmp_path / "again")


def test_a_switch_to_float32_changes_only_the_steps_from_it_and_may_be_made_when_a_run_continues(tmp_path):
    settings = waitline_train.TrainSettings(kind="mdlm", steps=4, batch_size=4, warmup=1, shape=TINY, log_every=1)
    switched = dataclasses.replace(settings, float32_from=2)
    curves = [[point[1] for point in waitline_train.train(run, log=lambda _: None)[2]["loss_curve"]]
              for run in (settings, switched, dataclasses.replace(settings, precision="float32"))]
    bfloat16, switched_curve, float32 = curves
    assert switched_curve[:2] == bfloat16[:2] and switched_curve[2:] != bfloat16[2:] and switched_curve != float32
    waitline_train.train(settings, log=lambda _: None, work=tmp_path, until=2)
    _, _, resumed = waitline_train.train(switched, log=lambda _: None, work=tmp_path)
    assert [point[1] for point in resumed["loss_curve"]] == switched_curve
    waitline_train.train(settings, log=lambda _: None, work=tmp_path / "again", until=2)
    with pytest.raises(ValueError, match="switch at step 2 or later"):
        waitline_train.train(dataclasses.replace(settings, float32_from=1), log=lambda _: None,
                             work=tmp_path / "again")


def test_a_switch_to_float32_is_part_of_the_command_and_the_card(tmp_path):
    out = tmp_path / "model"
    waitline_train.main(["--model", "ar", "--steps", "2", "--batch-size", "4", "--warmup", "1", "--hidden", "32",
                         "--layers", "1", "--heads", "2", "--ffn", "64", "--eval-per-task", "0", "--float32-from", "1",
                         "--out", str(out)])
    log = json.loads((out / "training_log.json").read_text())
    assert "--precision bfloat16 --float32-from 1 --hidden 32" in log["command"]
    assert log["settings"]["float32_from"] == 1
    assert "forward pass autocast to bfloat16 until step 1, float32 from there on." in (out / "README.md").read_text()


@pytest.mark.parametrize(("written", "now", "steps_done", "allowed"), [
    ({}, (0.4, 7000), 7000, True),  # a mixture added where the run stands
    ({}, (0.4, 6000), 7000, False),  # ... or claimed for steps already trained without it
    ({"common_share": 0.4, "common_from": 7000}, (0.4, 7000), 9000, True),
    ({"common_share": 0.4, "common_from": 7000}, (0.5, 7000), 9000, False),  # another share for steps done
    ({"common_share": 0.4, "common_from": 7000}, (0.0, 0), 9000, False),  # the mixture dropped after it began
    ({"common_share": 0.4, "common_from": 9500}, (0.5, 9000), 9000, True),  # changed before it ever applied
])
def test_the_mixture_schedule_may_change_only_for_steps_not_yet_run(written, now, steps_done, allowed):
    settings = waitline_train.TrainSettings(kind="ar", common_share=now[0], common_from=now[1])
    if allowed:
        waitline_train.check_mixture_schedule(settings, written, steps_done)
    else:
        with pytest.raises(ValueError, match="mixture"):
            waitline_train.check_mixture_schedule(settings, written, steps_done)


def test_the_card_states_where_the_curriculum_started_as_the_run_recorded_it(tmp_path):
    growing = waitline_train.TrainSettings(kind="ar", steps=0, shape=TINY)
    _, _, record = waitline_train.train(growing, log=lambda _: None)
    start = waitline_train.CURRICULUM_START
    assert record["starting_length"] == start
    assert waitline_train._curriculum_start([record]) == f"lists of 3-{start} people first"
    _, _, whole = waitline_train.train(dataclasses.replace(growing, grow_below=0.0), log=lambda _: None)
    assert waitline_train._curriculum_start([whole]) == "lists of any length (up to 15 people) from the start"
    earlier = {**record, "loss_curve": [[50, 0.5, 9]]}
    assert waitline_train._curriculum_start([earlier, {**record, "starting_length": 9}]).startswith("lists of up to 9")
    older = {key: value for key, value in record.items() if key != "starting_length"}  # a log from before the field
    assert waitline_train._curriculum_start([earlier, older]).startswith("lists of up to 9 people")


def test_rainbow_padding_ends_each_answer_with_one_eos_then_cycles_the_pad_tokens():
    """--rainbow-pads K: every canvas is prompt, answer, one end of text, then pad_0..pad_{K-1} in a cycle to the
    row's width (Kim et al.); the pads are trained on as padding, not counted as the answer's own tokens."""
    tokenizer = build_tokenizer()
    cycle = tuple(with_rainbow_pads(tokenizer, 3))
    assert cycle == tuple(range(len(tokenizer) - 3, len(tokenizer)))  # after every id the AR twin knows
    assert tokenizer.decode([*tokenizer.encode('["Ann"]'), tokenizer.eos_token_id, *cycle], skip_special_tokens=True) \
        == '["Ann"]'
    plain, padded = (waitline_train.Batches(tokenizer, seed=5, batch_size=8, pad_cycle=pads) for pads in ((), cycle))
    pairs = waitline_train.Batches(tokenizer, seed=5, batch_size=8).encoded()
    (ids, side, own), (rainbow, rainbow_side, rainbow_own) = plain.mdlm(width_group=4), padded.mdlm(width_group=4)
    assert torch.equal(side, rainbow_side) and torch.equal(own, rainbow_own)  # same widths, same answers
    pairs.sort(key=lambda pair: len(pair[0]) + len(pair[1]))
    for row, (prompt, answer) in enumerate(pairs):
        end, width = len(prompt) + len(answer), int(side[row].nonzero().max()) + 1
        assert rainbow[row, :end].tolist() == ids[row, :end].tolist() == prompt + answer  # answer closes with EOS
        assert rainbow[row, end:width].tolist() == [cycle[i % 3] for i in range(width - end)]
        assert (ids[row, end:width] == tokenizer.eos_token_id).all()


def test_rainbow_pads_extend_a_saved_models_vocabulary_and_are_named_in_the_command_and_card(tmp_path):
    start, out = tmp_path / "start", tmp_path / "model"
    tiny = ["--batch-size", "4", "--warmup", "1", "--hidden", "32", "--layers", "1", "--heads", "2", "--ffn", "64",
            "--eval-per-task", "1"]
    waitline_train.main(["--model", "mdlm", "--steps", "1", *tiny, "--out", str(start)])
    waitline_train.main(["--model", "mdlm", "--steps", "2", *tiny, "--init-from", str(start), "--rainbow-pads", "7",
                         "--out", str(out)])
    before, after = (LlamaForCausalLM.from_pretrained(folder) for folder in (start, out))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert after.config.vocab_size == len(tokenizer) == before.config.vocab_size + 7
    assert tokenizer.convert_ids_to_tokens(list(range(before.config.vocab_size, len(tokenizer)))) == \
        [f"<pad_{i}>" for i in range(7)]
    log = json.loads((out / "training_log.json").read_text())
    assert log["command"].endswith("--rainbow-pads 7") and log["settings"]["rainbow_pads"] == 7
    assert "Rainbow Padding" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="MDLM only"):
        waitline_train.train(waitline_train.TrainSettings(kind="ar", steps=1, shape=TINY, rainbow_pads=7))


def test_the_long_share_draws_whole_batches_of_the_longest_lists_and_leaves_the_stream_alone_at_zero(tokenizer):
    """--long-share: that share of batches is all of the longest lists allowed (ParallelBench's long file is 15
    people; a uniform draw of 3-15 gives them one batch in 13); at share 0 the data stream is the one it always was."""
    def lengths(share: float, seed: int = 4) -> list[int]:
        batches = waitline_train.Batches(tokenizer, seed=seed, batch_size=2, long_share=share)
        return [len(batches.examples()[0].people) for _ in range(200)]

    plain, half, whole = lengths(0.0), lengths(0.5), lengths(1.0)
    assert whole == [15] * 200
    assert 0.45 < sum(n == 15 for n in half) / 200 < 0.65 and min(half) == 3  # half, plus the uniform draw's share
    assert sum(n == 15 for n in plain) / 200 < 0.15
    before = waitline_train.Batches(tokenizer, seed=4, batch_size=2)  # the stream without the setting at all
    assert plain == [len(before.examples()[0].people) for _ in range(200)]


def test_the_invented_rate_sets_the_share_of_made_up_names_and_the_card_names_earlier_rates(tokenizer):
    """--invented-rate: that share of first and last names comes from syllables, not from the training pool."""
    pool = set(name_pool("first", "train")) | set(name_pool("last", "train"))

    def invented_share(rate: float) -> float:
        batches = waitline_train.Batches(tokenizer, seed=3, batch_size=8, invented_rate=rate)
        parts = [part for _ in range(40) for example in batches.examples() for person in example.people
                 for part in person.split(" ")]
        return sum(part not in pool for part in parts) / len(parts)

    # a few syllable names happen to be real ones too ("Cara", "Damon")
    assert invented_share(0.0) == 0.0 and 0.2 < invented_share(0.3) < 0.4 and invented_share(1.0) > 0.95
    run = {"settings": {"invented_rate": 0.3}}
    assert waitline_train._invented([run]) == "30% of names"
    assert waitline_train._invented([{"settings": {}}, run]) == "30% of names (5% in the earlier runs)"
    assert waitline_train._invented([{"settings": {}}, {"settings": {}}]) == "5% of names"
