"""rest-design's helper objects go through run checkpoints as plain data, and only because the lab allowed them."""

import pytest
import torch

from lab.rest_components import AnchorStore
from queryshift import plainstate


class NotAllowed:
    def __init__(self):
        self.x = torch.ones(2)


def test_allowed_lab_objects_round_trip_and_others_are_refused():
    store = object.__new__(AnchorStore)
    store.__dict__.update({"items": [torch.arange(3.0)], "size": 4})
    back = plainstate.from_plain(plainstate.to_plain({"anchors": store}))["anchors"]
    assert type(back) is AnchorStore and back.size == 4 and torch.equal(back.items[0], torch.arange(3.0))
    with pytest.raises(TypeError, match="cannot be stored"):
        plainstate.to_plain(NotAllowed())
    planted = {plainstate.OBJECT_TAG: f"{__name__}:NotAllowed", "attrs": {"x": 1}}
    with pytest.raises(plainstate.UnsafeStateError):
        plainstate.from_plain(planted)
