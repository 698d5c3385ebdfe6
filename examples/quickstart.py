"""Adapt the shipped shapes-clip model online to noisy image queries and compare with no adaptation.

    python examples/quickstart.py     # about a minute on a laptop CPU; no download
"""

import queryshift

settings = dict(
    model="shapes-clip",  # the shipped model: a small CLIP trained on the synthetic shapes world
    data="shapes",  # its test split: 1,000 images, 5,000 captions
    direction="i2t",  # image queries against a caption gallery
    shift="gaussian_noise:5",  # every query image corrupted by strong Gaussian noise
    max_queries=500,  # the first 500 queries of the shuffled stream
    progress=False,
)
source = queryshift.run(queryshift.RunConfig(method="source", **settings))  # no adaptation
tcr = queryshift.run(queryshift.RunConfig(method="tcr", **settings))  # TCR, batch by batch
print(f"R@1 under {settings['shift']}: source {source['r1']:.2f}, tcr {tcr['r1']:.2f} "
      f"({tcr['r1'] - source['r1']:+.2f})")
