"""dxtrain: PyTorch training of one-step drifting generators on top of dxfield.

The trainer, data sets, generators, feature groups and the ``dxtrain`` CLI
land with their own issue; today this package only reserves the name and
documents the contract it will follow: features go to :mod:`dxfield` through
DLPack (zero-copy, same device) and the field comes back the same way.
"""

__version__ = "0.1.0.dev0"
