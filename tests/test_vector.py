"""SteeringVector: dense and sparse storage, round trip, validation."""

from __future__ import annotations

import pytest
import torch

from steerplug import SteeringVector, VectorMetadata


def test_sparse_and_dense_round_trip(tmp_path):
    w = torch.zeros(100)
    w[[3, 50, 97]] = torch.tensor([1.5, -2.0, 0.25])
    meta = VectorMetadata(model_name="m", hook_name="blocks.2.hook_resid_post", sae="org/sae")
    for vec in (SteeringVector.from_dense(w, metadata=meta), SteeringVector(100, weights=w, metadata=meta)):
        folder = vec.save_pretrained(tmp_path / ("s" if vec.is_sparse else "d"))
        back = SteeringVector.from_pretrained(folder)
        assert back.is_sparse == vec.is_sparse
        assert torch.equal(back.dense(), w)
        assert back.metadata == meta
        idx, vals = back.support()
        assert idx.tolist() == [3, 50, 97] and vals.tolist() == [1.5, -2.0, 0.25]


def test_top_k_keeps_largest_magnitudes():
    w = torch.tensor([0.1, -5.0, 0.0, 3.0, -0.2])
    vec = SteeringVector.from_dense(w, top_k=2)
    assert vec.indices.tolist() == [1, 3] and vec.nnz == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"indices": [0, 10], "values": [1.0, 1.0]}, r"\[0, 10\)"),
    ({"indices": [1, 1], "values": [1.0, 1.0]}, "duplicates"),
    ({"indices": [1], "values": [1.0, 2.0]}, "differ in length"),
    ({"indices": [1], "values": [float("inf")]}, "NaN or inf"),
])
def test_bad_vectors_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SteeringVector(10, **kwargs)


def test_dense_length_checked_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="length 5, expected d_sae=6"):
        SteeringVector(6, weights=torch.ones(5))
    from steerplug.hub import ArtifactNotFoundError

    tmp_path.joinpath("x").mkdir()
    with pytest.raises(ArtifactNotFoundError, match="steering_vector.json"):
        SteeringVector.from_pretrained(tmp_path / "x")
