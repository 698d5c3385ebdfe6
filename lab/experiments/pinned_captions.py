"""Experiment (not shipped, issue 10): the world's ceiling under caption generators that pin scenes down more.

The oracle of ``lab/experiments/shapes_oracle.py`` (exact, no model) on shapes-5k with the templates of
``queryshift.data.shapes`` patched in three ways; the scenes do not change (objects are drawn before captions):

* ``size_tails``: the tail names each further object's size too ("with a large blue square");
* ``full_single``: every caption of a one-object scene names colour, shape, size and grid position (the
  missing ones appended: "in the {pos}", "that is {z1}", "coloured {c1}");
* ``both``.

    python lab/experiments/pinned_captions.py     # about 3 minutes on one core

Results: lab/experiments/pinned_captions.json; reading: docs/model-card-shapes-clip.md (the world's ceiling).
"""
import json
import os
import sys

from queryshift.data import shapes

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import shapes_oracle  # noqa: E402  (lab/experiments/shapes_oracle.py)


def patch_templates(size_tails: bool, full_single: bool) -> None:
    tail = " {{z{k}}} {{c{k}}} {{s{k}}}" if size_tails else " {{c{k}}} {{s{k}}}"
    templates = shapes.build_templates(shapes.HEADS, " with a" + tail, " and a" + tail,
                                       " and a {{z{k}}} {{c{k}}} {{s{k}}}")
    if full_single:
        for key, text in templates.items():
            if key.endswith("/1"):
                for field, words in (("{pos}", " in the {pos}"), ("{z1}", " that is {z1}"), ("{c1}", " coloured {c1}")):
                    text += "" if field in text else words
                templates[key] = text
    shapes.TEMPLATES.clear()
    shapes.TEMPLATES.update(templates)
    shapes._PARSERS.clear()
    shapes._PARSERS.update({k: shapes._template_regex(t) for k, t in templates.items()})


if __name__ == "__main__":
    result = {}
    for name, switches in {"shipped": (False, False), "size_tails": (True, False), "full_single": (False, True),
                           "both": (True, True)}.items():
        patch_templates(*switches)
        r = shapes_oracle.oracle("test5k")
        result[name] = {k: r[k] for k in ("i2t", "t2i", "t2i_r1_by_object_count", "i2t_r1_by_object_count")}
        print(name, json.dumps(result[name]), flush=True)
    with open(os.path.join(HERE, "pinned_captions.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
