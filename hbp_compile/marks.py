"""The marks a stage leaves on graph nodes (``node.meta`` keys) for a later stage to read.

The keys live here, below every stage, so that the stage that reads a mark does not import the one
that wrote it (capture -> detect, detect's state-pair packing -> its residual classifier).
"""

# capture -> detect: whether a placeholder's real input requires grad (fake values do not say);
# detection never takes a value no gradient reaches as a state
REQUIRES_GRAD_META_KEY = "hbp_requires_grad"
# A state pair (a, b) packed into one state s_t = stack([a_t, b_t]) (detect/pairs.py) is marked on the
# graph: s_t carries (run, t), a select of it the component it reads (0 = a, 1 = b).
PACKED_STATE_META_KEY = "hbp_packed_state"
UNPACK_META_KEY = "hbp_unpack"
