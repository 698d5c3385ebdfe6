import pytest

from queryshift.data import DataError
from queryshift.data.av import AVDataset


def _dataset():
    return AVDataset(
        items={"video": ["a.mp4", "b.mp4", "c.mp4"], "audio": ["a.wav", "b.wav", "c.wav", "b2.wav"]},
        groups={"video": [0, 1, 2], "audio": [0, 1, 2, 1]},
        loaders={"video": lambda i: f"v{i}", "audio": lambda i: f"a{i}"},
        name="toy",
    )


def test_relevance_follows_groups_both_ways():
    ds = _dataset()
    assert ds.relevance("video", "audio") == [[0], [1, 3], [2]]
    assert ds.relevance("audio", "video") == [[0], [1], [2], [1]]
    assert ds.count("audio") == 4 and ds.load("video", 2) == "v2"


def test_fingerprint_changes_with_groups():
    a, b = _dataset(), _dataset()
    assert a.fingerprint() == b.fingerprint()
    b.groups["audio"][3] = 2
    assert a.fingerprint() != b.fingerprint()


def test_bad_inputs_named():
    with pytest.raises(DataError, match="no text items"):
        _dataset().load("text", 0)
    with pytest.raises(DataError, match="3 items but 2 group ids"):
        AVDataset(items={"video": ["a", "b", "c"], "audio": ["a"]}, groups={"video": [0, 1], "audio": [0]},
                  loaders={"video": str, "audio": str})
