"""The research lab of queryshift: REST's design space, design / ablation / validation suites, experiment scripts.

Not part of the installed package. Importing ``lab`` registers the lab's methods (``rest-design``) in
:mod:`queryshift.methods`; ``python -m lab.cli`` is the ``queryshift`` CLI with the lab registered and its suites
(``lab/suites``) found by name. See lab/README.md.
"""

from lab import rest_design  # noqa: E402,F401  (registers the method rest-design)
