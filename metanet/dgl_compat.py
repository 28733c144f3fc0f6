"""Import DGL without its GraphBolt subsystem.

``dgl==2.1.0`` (the newest Linux wheel) works on torch 2.14 for graphs, fused message passing and
autograd, but ``import dgl`` imports ``dgl.graphbolt``, whose compiled library exists only for
torch <= 2.2. We never sample with GraphBolt, so an empty ``dgl.graphbolt`` module is registered
before the import. Everything in this project imports DGL as ``from metanet.dgl_compat import dgl``.
"""

from __future__ import annotations

import sys
import types

if "dgl" not in sys.modules:
    _stub = types.ModuleType("dgl.graphbolt")
    _stub.__doc__ = "Stub: GraphBolt is not used by this project (see metanet.dgl_compat)."
    _stub.__path__ = []  # a package, so `import dgl.graphbolt.x` fails cleanly instead of oddly
    sys.modules.setdefault("dgl.graphbolt", _stub)

import dgl  # noqa: E402
import dgl.function as dglfn  # noqa: E402

__all__ = ["dgl", "dglfn"]
