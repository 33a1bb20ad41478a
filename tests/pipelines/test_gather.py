import numpy as np
import pytest
import torch

from pipelines.gather import gather_predictions


def test_single_process_dedupes_and_sorts():
    keys = ["val-00000002", "val-00000000", "val-00000001", "val-00000002"]
    probs = torch.tensor([0.2, 0.9, 0.4, 0.2])
    labels = torch.tensor([0, 1, 0, 0])
    out_keys, out_probs, out_labels = gather_predictions(keys, probs, labels)
    assert out_keys == ["val-00000000", "val-00000001", "val-00000002"]
    np.testing.assert_allclose(out_probs, [0.9, 0.4, 0.2], rtol=1e-6)
    assert out_labels.tolist() == [1, 0, 0]


def test_conflicting_labels_for_one_key_is_an_error():
    with pytest.raises(ValueError, match="val-00000001"):
        gather_predictions(["val-00000001", "val-00000001"], [0.1, 0.1], [0, 1])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="length"):
        gather_predictions(["a"], [0.1, 0.2], [0, 1])
