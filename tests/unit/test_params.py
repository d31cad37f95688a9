"""Unit tests for common.params and common.model, on the tiny random BERT (fast, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from common.config import JobConfig
from common.errors import ModelError, ParameterMismatchError
from common.model import (
    BuiltModel,
    base_fingerprint,
    build_model,
    resolve_model_dir,
    trainable_names,
)
from common.params import (
    add,
    check_arrays,
    get_trainable,
    max_abs,
    named_state,
    set_trainable,
    subtract,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TINY = JobConfig(model="tiny-random")


@pytest.fixture(scope="module")
def lora() -> BuiltModel:
    return build_model(TINY, 2)


@pytest.fixture
def fresh_lora() -> BuiltModel:
    return build_model(TINY, 2)


def test_get_trainable_shapes_and_dtype(lora: BuiltModel) -> None:
    arrays = get_trainable(lora.model)
    params = [p for p in lora.model.parameters() if p.requires_grad]
    assert len(arrays) == len(params) > 0
    for arr, p in zip(arrays, params, strict=True):
        assert arr.dtype == np.float32
        assert arr.shape == tuple(p.shape)
    # copies, not views of the live tensors
    arrays[0][...] = 123.0
    assert not torch.all(params[0] == 123.0)


def test_set_get_round_trip(fresh_lora: BuiltModel) -> None:
    model = fresh_lora.model
    rng = np.random.default_rng(0)
    new = [rng.standard_normal(a.shape).astype(np.float32) for a in get_trainable(model)]
    before_frozen = base_fingerprint(model)
    set_trainable(model, new)
    got = get_trainable(model)
    assert len(got) == len(new)
    for a, b in zip(got, new, strict=True):
        np.testing.assert_array_equal(a, b)
    assert base_fingerprint(model) == before_frozen  # frozen weights untouched


def test_set_trainable_changes_model_output(fresh_lora: BuiltModel) -> None:
    model = fresh_lora.model.eval()
    ids = fresh_lora.tokenizer(["a tiny test"], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits.clone()
    set_trainable(model, [np.full(a.shape, 0.05, dtype=np.float32) for a in get_trainable(model)])
    with torch.no_grad():
        after = model(**ids).logits
    assert not torch.allclose(before, after)


def test_check_arrays_accepts_own(lora: BuiltModel) -> None:
    check_arrays(lora.model, get_trainable(lora.model), "test")


def test_check_arrays_wrong_count(lora: BuiltModel) -> None:
    arrays = get_trainable(lora.model)
    with pytest.raises(ParameterMismatchError, match="arrays instead of"):
        check_arrays(lora.model, arrays[:-1], "update")
    with pytest.raises(ParameterMismatchError, match="arrays instead of"):
        check_arrays(lora.model, [*arrays, arrays[0]], "update")
    with pytest.raises(ParameterMismatchError):
        check_arrays(lora.model, [], "update")


def test_check_arrays_wrong_shape(lora: BuiltModel) -> None:
    arrays = get_trainable(lora.model)
    arrays[1] = np.zeros((*arrays[1].shape, 1), dtype=np.float32)
    with pytest.raises(ParameterMismatchError, match="shape"):
        check_arrays(lora.model, arrays, "update")


def test_check_arrays_wrong_dtype(lora: BuiltModel) -> None:
    arrays = get_trainable(lora.model)
    arrays[0] = arrays[0].astype(np.float64)
    with pytest.raises(ParameterMismatchError, match="float64"):
        check_arrays(lora.model, arrays, "update")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_arrays_non_finite(lora: BuiltModel, bad: float) -> None:
    arrays = get_trainable(lora.model)
    arrays[-1] = arrays[-1].copy()
    arrays[-1].flat[0] = bad
    with pytest.raises(ParameterMismatchError, match="not finite"):
        check_arrays(lora.model, arrays, "update")


def test_set_trainable_rejects_and_leaves_model(fresh_lora: BuiltModel) -> None:
    model = fresh_lora.model
    arrays = get_trainable(model)
    bad = [np.zeros_like(a) for a in arrays]
    bad[-1].flat[0] = np.nan
    with pytest.raises(ParameterMismatchError):
        set_trainable(model, bad)
    for a, b in zip(get_trainable(model), arrays, strict=True):
        np.testing.assert_array_equal(a, b)


def test_array_arithmetic() -> None:
    a = [np.array([1.0, -4.0], dtype=np.float32), np.zeros((2, 2), dtype=np.float32)]
    b = [np.array([0.5, 1.0], dtype=np.float32), np.full((2, 2), 2.0, dtype=np.float32)]
    diff = subtract(a, b)
    np.testing.assert_array_equal(diff[0], [0.5, -5.0])
    assert all(d.dtype == np.float32 for d in diff)
    back = add(diff, b)
    for x, y in zip(back, a, strict=True):
        np.testing.assert_array_equal(x, y)
    assert max_abs(diff) == 5.0
    assert max_abs([]) == 0.0


def test_named_state_matches_trainable(lora: BuiltModel) -> None:
    state = named_state(lora.model)
    assert list(state) == trainable_names(lora.model)
    for t, arr in zip(state.values(), get_trainable(lora.model), strict=True):
        np.testing.assert_array_equal(t.numpy(), arr)


# ---------------------------------------------------------------------------------------------------- model


def test_base_fingerprint_same_seed_equal(lora: BuiltModel) -> None:
    other = build_model(TINY, 2)
    assert base_fingerprint(other.model) == base_fingerprint(lora.model)
    for a, b in zip(get_trainable(other.model), get_trainable(lora.model), strict=True):
        np.testing.assert_array_equal(a, b)  # same seed: same LoRA init and head too


def test_base_fingerprint_differs_by_seed(lora: BuiltModel) -> None:
    other = build_model(JobConfig(model="tiny-random", seed=1), 2)
    assert base_fingerprint(other.model) != base_fingerprint(lora.model)


def test_lora_trains_only_adapters_and_classifier(lora: BuiltModel) -> None:
    names = trainable_names(lora.model)
    assert names
    assert all("lora_" in n or "classifier" in n for n in names), names
    assert any("lora_A" in n for n in names)
    assert any("lora_B" in n for n in names)
    assert any("classifier" in n for n in names)
    frozen = [n for n, p in lora.model.named_parameters() if not p.requires_grad]
    assert any("embeddings" in n for n in frozen)
    assert not any("lora_" in n for n in frozen)
    # the adapters sit on the attention query and value projections only
    assert all(".query." in n or ".value." in n for n in names if "lora_" in n)


def test_lora_rank_shapes() -> None:
    built = build_model(JobConfig(model="tiny-random", lora_r=3), 2)
    lora_a = [p for n, p in built.model.named_parameters() if "lora_A" in n]
    assert lora_a
    assert all(p.shape[0] == 3 for p in lora_a)


def test_ffa_lora_trains_b_only_and_fingerprints_the_frozen_a() -> None:
    ffa = build_model(JobConfig(model="tiny-random", lora_freeze_a=True), 2)
    names = trainable_names(ffa.model)
    assert names and not any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    plain = build_model(JobConfig(model="tiny-random"), 2)
    assert len(names) == len(trainable_names(plain.model)) - sum("lora_A" in n for n in trainable_names(plain.model))
    again = build_model(JobConfig(model="tiny-random", lora_freeze_a=True), 2)
    assert base_fingerprint(again.model) == base_fingerprint(ffa.model)  # every side builds the same frozen A
    with torch.no_grad():
        next(p for n, p in again.model.named_parameters() if "lora_A" in n).add_(1.0)
    assert base_fingerprint(again.model) != base_fingerprint(ffa.model)


def test_full_finetune_trains_everything() -> None:
    built = build_model(JobConfig(model="tiny-random", finetune="full"), 3)
    params = list(built.model.named_parameters())
    assert params
    assert all(p.requires_grad for _, p in params)
    assert not any("lora_" in n for n, _ in params)
    assert trainable_names(built.model) == [n for n, _ in params]
    assert len(get_trainable(built.model)) == len(params)
    classifier = dict(params)["classifier.weight"]
    assert classifier.shape[0] == 3


def test_build_model_needs_two_labels() -> None:
    with pytest.raises(ModelError, match="at least 2 labels"):
        build_model(TINY, 1)


def test_resolve_model_dir_packaged() -> None:
    path = resolve_model_dir("tiny-random")
    assert path.is_dir()
    assert (path / "config.json").is_file()
    assert resolve_model_dir("minilm") == path


def test_resolve_model_dir_nonexistent(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither"):
        resolve_model_dir(str(tmp_path / "no-such-model"))


def test_resolve_model_dir_file_is_not_a_dir(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"0")
    with pytest.raises(ModelError):
        resolve_model_dir(str(f))


def test_resolve_model_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model_dir(str(tmp_path))


def test_resolve_model_dir_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path
