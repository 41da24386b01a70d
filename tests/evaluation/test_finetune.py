"""Tests for dwml.evaluation.finetune: metrics vs hand values, task loading on the real glue_filtered files, carving, bad inputs,
and a tiny RoBERTa that must learn an easy synthetic task clearly above the majority class."""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dwml.evaluation import finetune as ft, glue
from dwml.errors import DwmlError
from dwml.models.model import Arch, build_model

from runfixtures import WORDS, quick_finetune_cfg as _quick_cfg, sentences as _sentences, write_jsonl as _write_jsonl

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


# --------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny tokenizer + model folder, and a synthetic "does the sentence contain 'dog'" task


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(WORDS + ["dog"])] * 2, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3, 4]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    path = tmp_path_factory.mktemp("tiny_model")
    model = build_model(Arch(layers=1, heads=2, hidden=32, intermediate=64, vocab_size=tok.get_vocab_size(),
                             max_positions=130), seed=0)
    hf_logging.disable_progress_bar()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory) -> Path:
    """sst2-format files: label = 1 iff the sentence contains 'dog' (majority class: 0, about 65%)."""
    path = tmp_path_factory.mktemp("easy_glue")
    _write_jsonl(path / "sst2.train.jsonl", _sentences(400, seed=1))
    _write_jsonl(path / "sst2.valid.jsonl", _sentences(200, seed=2))
    return path


# --------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_hand_values():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 1])
    # TP=4 FN=1 FP=2 TN=3
    assert ft.accuracy(preds, labels) == pytest.approx(0.7)
    assert glue.binary_f1(preds, labels) == pytest.approx(8 / 11)
    assert glue.matthews_corrcoef(preds, labels) == pytest.approx((4 * 3 - 2 * 1) / math.sqrt(6 * 5 * 5 * 4))
    assert glue.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert glue.matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    assert glue.matthews_corrcoef(np.ones(10, int), labels) == 0.0  # constant predictions
    assert glue.binary_f1(np.zeros(4, int), np.zeros(4, int)) == 0.0  # no positives anywhere
    # 3 classes: C = [[2,1,0],[0,2,0],[1,0,1]] (rows true), t=(3,2,2) p=(3,3,1) c=5 s=7
    y = np.array([0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 1, 1, 1, 0, 2])
    expect = (5 * 7 - (9 + 6 + 2)) / math.sqrt((49 - (9 + 9 + 1)) * (49 - (9 + 4 + 4)))
    assert glue.matthews_corrcoef(p, y) == pytest.approx(expect)
    assert ft.compute_metrics(("accuracy", "mcc"), preds, labels) == {
        "accuracy": pytest.approx(0.7), "mcc": pytest.approx(10 / math.sqrt(600))}


def test_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for k in (2, 3):
        for _ in range(5):
            y, p = rng.integers(0, k, 50), rng.integers(0, k, 50)
            assert ft.accuracy(p, y) == pytest.approx(metrics.accuracy_score(y, p))
            assert glue.matthews_corrcoef(p, y) == pytest.approx(metrics.matthews_corrcoef(y, p))
            if k == 2:
                assert glue.binary_f1(p, y) == pytest.approx(metrics.f1_score(y, p))


def test_linear_warmup_decay():
    values = [ft.linear_warmup_decay(s, warmup=4, total=20) for s in (0, 3, 4, 12, 19, 20, 25)]
    assert values == pytest.approx([0.25, 1.0, 1.0, 0.5, 1 / 16, 0.0, 0.0])
    assert ft.linear_warmup_decay(0, warmup=0, total=10) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------
# Data


def test_carve_split_stratified_and_seeded():
    labels = [0] * 30 + [1] * 11 + [2] * 5
    tr, ev = glue.carve_split(labels, 0.5, seed=3)
    assert sorted(np.concatenate([tr, ev]).tolist()) == list(range(len(labels)))
    assert set(tr.tolist()).isdisjoint(ev.tolist())
    counts = np.bincount(np.asarray(labels)[tr], minlength=3)
    assert counts.tolist() == [15, round(5.5), round(2.5)]
    tr2, _ = glue.carve_split(labels, 0.5, seed=3)
    tr3, _ = glue.carve_split(labels, 0.5, seed=4)
    assert np.array_equal(tr, tr2) and not np.array_equal(tr, tr3)


def test_carve_split_keeps_groups_together():
    # Groups of sizes 1..8; group g's label is g % 2 (so each group is pure and strata are the even/odd groups).
    groups = [g for g in range(1, 9) for _ in range(g)]
    labels = [g % 2 for g in groups]
    tr, ev = glue.carve_split(labels, 0.5, seed=0, groups=groups)
    assert set(np.asarray(groups)[tr]).isdisjoint(np.asarray(groups)[ev])
    assert sorted(np.concatenate([tr, ev]).tolist()) == list(range(len(labels)))
    # Strata: odd groups 1+3+5+7 = 16 examples (target 8), even groups 2+4+6+8 = 20 (target 10); greedy hits both
    # targets within half a group of the largest size.
    counts = np.bincount(np.asarray(labels)[tr], minlength=2)
    assert abs(counts[1] - 8) <= 3 and abs(counts[0] - 10) <= 4
    # Singleton groups reduce to the plain stratified split's counts.
    tr_single, _ = glue.carve_split(labels, 0.5, seed=0, groups=list(range(len(labels))))
    assert np.bincount(np.asarray(labels)[tr_single]).tolist() == [10, 8]


def _first_row(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


def _n_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


real = pytest.mark.skipif(not ft.DEFAULT_DATA_DIR.is_dir(), reason="glue_filtered data not available")


@real
@pytest.mark.parametrize("task", ft.DEFAULT_TASKS)
def test_real_task_loads(task):
    d = ft.DEFAULT_DATA_DIR
    data = ft.load_task(task, ft.FinetuneConfig(tasks=[task]))
    has_train = (d / f"{task}.train.jsonl").is_file()
    assert data.carved == (not has_train) == (task in ("boolq", "multirc", "qnli", "sst2"))
    n_valid = _n_lines(d / f"{task}.valid.jsonl")
    if data.carved:
        assert "train carved from valid" in data.note
        assert len(data.train) + len(data.eval) == n_valid
        assert abs(len(data.train) - n_valid / 2) <= 0.02 * n_valid
        if ft.TASKS[task].group_by:  # e.g. no MultiRC paragraph is both trained on and scored
            assert {e.group for e in data.train}.isdisjoint(e.group for e in data.eval)
            assert "grouped by" in data.note
        first = glue.read_examples(d / f"{task}.valid.jsonl", ft.TASKS[task])[0]
        assert first in data.train or first in data.eval
    else:
        assert data.note == "" and len(data.eval) == n_valid
        assert len(data.train) == _n_lines(d / f"{task}.train.jsonl")
        first = data.train[0]
    row = _first_row(d / (f"{task}.train.jsonl" if has_train else f"{task}.valid.jsonl"))
    assert first.label == row["label"]
    pair = {  # how BabyLM's pipeline forms the (A, B) pair of each task
        "cola": lambda r: (r["sentence"], None),
        "sst2": lambda r: (r["sentence"], None),
        "mrpc": lambda r: (r["sentence1"], r["sentence2"]),
        "rte": lambda r: (r["sentence1"], r["sentence2"]),
        "qqp": lambda r: (r["question1"], r["question2"]),
        "mnli": lambda r: (r["premise"], r["hypothesis"]),
        "qnli": lambda r: (r["question"], r["sentence"]),
        "boolq": lambda r: (r["question"], r["passage"]),
        "multirc": lambda r: (f"Question: {r['question']} Answer: {r['answer']}", r["paragraph"]),
        "wsc": lambda r: (f'Does "{r["span2_text"]}" refer to "{r["span1_text"]}" in this passage?', r["text"]),
    }[task]
    expected = pair(row)
    assert (first.text_a, first.text_b) == expected
    labels = {e.label for e in data.train + data.eval}
    assert labels == set(range(ft.TASKS[task].num_labels))
    assert set(data.extra_evals) == ({"mnli-mm"} if task == "mnli" else set())


@real
def test_real_hand_checked_examples():
    cfg = ft.FinetuneConfig(max_eval_examples=10)
    cola = ft.load_task("cola", cfg)
    first = "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola.train[0] == ft.Example(first, None, 1)
    wsc = ft.load_task("wsc", cfg)
    assert wsc.train[0] == ft.Example(
        'Does "He" refer to "Mark" in this passage?',
        "Mark told Pete many lies about himself, which Pete included in his book. He should have been more skeptical.",
        0,
    )
    mnli = ft.load_task("mnli", cfg)
    assert len(mnli.eval) == 10 and len(mnli.extra_evals["mnli-mm"][0]) == 10 and len(mnli.train) == 10000


# --------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs(tmp_path, model_dir):
    with pytest.raises(DwmlError, match="unknown task 'stsb'"):
        ft.FinetuneConfig(tasks=["stsb"]).validate()
    with pytest.raises(DwmlError, match="reported automatically"):
        ft.FinetuneConfig(tasks=["mnli-mm"]).validate()
    with pytest.raises(DwmlError, match="carve_fraction"):
        ft.FinetuneConfig(carve_fraction=1.0).validate()
    with pytest.raises(DwmlError, match="finetune.device"):
        ft.FinetuneConfig(device="tpu").validate()
    with pytest.raises(DwmlError, match="data directory not found"):
        ft.load_task("cola", ft.FinetuneConfig(data_dir=str(tmp_path / "nope")))
    with pytest.raises(DwmlError, match=r"cola\.valid\.jsonl: file not found"):
        ft.load_task("cola", ft.FinetuneConfig(data_dir=str(tmp_path)))

    spec = ft.TASKS["mrpc"]
    cases = {
        '{"sentence1": "a", "sentence2": "b", "label": 2}\n': r"bad\.jsonl:1: field 'label'.*\[0, 2\)",
        '{"sentence1": "a", "label": 0}\n': r"bad\.jsonl:1: missing field 'sentence2'",
        '{"sentence1": "a", "sentence2": "b", "label": 0}\n{oops\n': r"bad\.jsonl:2: invalid JSON",
        '{"sentence1": 3, "sentence2": "b", "label": 0}\n': r"field 'sentence1': expected a string",
        "\n": r"no examples",
    }
    for text, pattern in cases.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(DwmlError, match=pattern):
            glue.read_examples(tmp_path / "bad.jsonl", spec)
    # Labels given as strings or booleans are accepted.
    (tmp_path / "ok.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": "1"}\n'
                                       '{"sentence1": "a", "sentence2": "b", "label": false}\n')
    assert [e.label for e in glue.read_examples(tmp_path / "ok.jsonl", spec)] == [1, 0]

    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    with pytest.raises(DwmlError, match="no config.json"):
        ft.finetune_model(empty_model, ft.FinetuneConfig(tasks=["cola"], device="cpu"))
    with pytest.raises(DwmlError, match="neither a model directory"):
        ft.resolve_models(empty_model)
    with pytest.raises(DwmlError, match="not found"):
        ft.resolve_models(tmp_path / "missing")
    with pytest.raises(DwmlError, match="--peer"):
        ft.resolve_models(model_dir, peer=0)
    # A folder whose weights are not a RoBERTa encoder (only the classifier may be missing).
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "encoder.layer.0.output" not in k}, broken / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(DwmlError, match="lacks encoder weights"):
        ft.load_classifier(broken, 2)


# --------------------------------------------------------------------------------------------------------------
# Model pieces


def test_classifier_keeps_pretrained_encoder(model_dir):
    from transformers import AutoModelForMaskedLM

    mlm = AutoModelForMaskedLM.from_pretrained(model_dir)
    clf = ft.load_classifier(model_dir, 3)
    assert clf.config.num_labels == 3
    assert torch.equal(clf.roberta.embeddings.word_embeddings.weight, mlm.roberta.embeddings.word_embeddings.weight)
    clf_layer, mlm_layer = clf.roberta.encoder.layer[0], mlm.roberta.encoder.layer[0]
    assert torch.equal(clf_layer.output.dense.weight, mlm_layer.output.dense.weight)
    assert ft.max_input_length(clf, 512) == 128 and ft.max_input_length(clf, 64) == 64


def test_padded_sorted_prediction_matches_one_by_one(model_dir):
    tok = ft.load_tokenizer(model_dir)
    clf = ft.load_classifier(model_dir, 2)
    clf.eval()
    examples = [ft.Example(r["sentence"], "the cat sat" if i % 2 else "a", r["label"])
                for i, r in enumerate(_sentences(9, seed=5))]
    ids = ft.encode(tok, examples, 128)
    assert ids[0][0] == 0 and ids[0][-1] == 2 and ids[0].count(2) == 3  # <s> A </s></s> B </s>
    with torch.inference_mode():
        single = torch.cat([clf(input_ids=torch.tensor([s])).logits for s in ids])
        batch_ids, mask = ft.pad_batch(ids, tok.pad_token_id)
        batched = clf(input_ids=batch_ids, attention_mask=mask).logits
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert ft.predict(clf, ids, 4, torch.device("cpu"), tok.pad_token_id).tolist() == single.argmax(-1).tolist()
    # Truncation keeps the special tokens and respects max_length.
    long = ft.encode(tok, [ft.Example(" ".join(["cat"] * 50), " ".join(["dog"] * 50), 0)], 16)[0]
    assert len(long) == 16 and long[0] == 0 and long[-1] == 2


# --------------------------------------------------------------------------------------------------------------
# End to end


def test_tiny_model_learns_easy_task(model_dir, easy_data):
    rng_before = torch.random.get_rng_state()
    result = ft.finetune_model(model_dir, _quick_cfg(easy_data))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone
    row = result["tasks"]["sst2"]
    assert row["n_train"] == 400 and row["n_eval"] == 200 and not row["carved"] and row["note"] == ""
    assert row["metrics"].keys() == {"accuracy"} and row["score"] == row["metrics"]["accuracy"]
    labels = [r["label"] for r in _sentences(200, seed=2)]
    assert row["majority"] == pytest.approx(1 - np.mean(labels))  # majority class is 0
    assert row["majority"] < 0.75
    assert row["score"] >= 0.9 and row["score"] >= row["majority"] + 0.2, row
    assert result["average"] == row["score"] and result["notes"] == []


def test_cli_run_dir_peers_and_carving(tmp_path, model_dir, capsys):
    data = tmp_path / "glue"
    data.mkdir()
    _write_jsonl(data / "sst2.valid.jsonl", _sentences(120, seed=7))  # no train file: carved
    _write_jsonl(data / "cola.train.jsonl", _sentences(60, seed=8))
    _write_jsonl(data / "cola.valid.jsonl", _sentences(40, seed=9))
    run = tmp_path / "RUN"
    for i in range(2):
        shutil.copytree(model_dir, run / "final" / f"peer{i}")
    parser = argparse.ArgumentParser()
    ft.register(parser.add_subparsers())
    out = tmp_path / "res.json"
    args = parser.parse_args(["finetune", str(run), "--tasks", "sst2,cola", "--data-dir", str(data), "--epochs", "1",
                              "--lr", "1e-3", "--batch-size", "16", "--device", "cpu", "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "train carved from valid" in text and "note: sst2:" in text
    res = json.loads(out.read_text())
    assert res["run"] == str(run) and list(res["peers"]) == ["peer0", "peer1"]
    p0, p1 = res["peers"]["peer0"]["tasks"], res["peers"]["peer1"]["tasks"]
    assert p0["sst2"]["carved"] and p0["sst2"]["n_train"] == 60 and p0["sst2"]["n_eval"] == 60
    assert set(p0["cola"]["metrics"]) == {"accuracy", "mcc"} and p0["cola"]["primary"] == "mcc"
    # Identical peers, same seed: identical results (the fine-tuning is deterministic).
    assert p0["sst2"]["final_train_loss"] == p1["sst2"]["final_train_loss"]
    assert p0["cola"]["metrics"] == p1["cola"]["metrics"]

    args = parser.parse_args(["finetune", str(run / "final"), "--peer", "1", "--tasks", "sst2", "--data-dir",
                              str(data), "--epochs", "1", "--max-train", "20", "--max-eval", "30", "--device", "cpu",
                              "--out", str(out), "--quiet"])
    args.func(args)
    res = json.loads(out.read_text())
    assert list(res["peers"]) == ["peer1"]
    assert res["peers"]["peer1"]["tasks"]["sst2"]["n_train"] == 20
    assert res["peers"]["peer1"]["tasks"]["sst2"]["n_eval"] == 30
    with pytest.raises(DwmlError, match="unknown task"):
        args = parser.parse_args(["finetune", str(model_dir), "--tasks", "cola,nope", "--data-dir", str(data)])
        args.func(args)
